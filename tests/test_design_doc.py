"""docs/DESIGN.md's Layout lists exactly the modules of bitpipe_fx/, passes/ and kernels/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bitpipe_fx", "passes", "kernels")


def _layout_block() -> str:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    section = text.split("\n## Layout", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def layout_paths(block: str) -> set[str]:
    """Rebuild full paths from the indented tree: a name ending in '/' opens a folder for deeper lines."""
    paths: set[str] = set()
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        match = re.match(r"^( *)(\S+)", line)
        if not match:
            continue
        indent, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([*(folder for _, folder in stack), name.rstrip("/")])
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
        paths.add(path)
    return paths


def test_tree_parser_nests_by_indentation() -> None:
    block = "a/\n  b.py   one\n  c/\n    d.py  two\n  e.py\nf.py\n"
    assert layout_paths(block) == {"a", "a/b.py", "a/c", "a/c/d.py", "a/e.py", "f.py"}


def test_every_module_is_in_the_layout_and_every_listed_module_exists() -> None:
    listed = {p for p in layout_paths(_layout_block()) if p.endswith(".py") and p.startswith(PACKAGES)}
    on_disk = {
        str(f.relative_to(ROOT))
        for package in PACKAGES
        for f in (ROOT / package).rglob("*.py")
        if "__pycache__" not in f.parts
    }
    missing = sorted(p for p in on_disk - listed if not p.endswith("__init__.py"))
    stale = sorted(listed - on_disk)
    assert not missing, f"modules missing from docs/DESIGN.md's Layout: {missing}"
    assert not stale, f"docs/DESIGN.md's Layout lists modules that do not exist: {stale}"
