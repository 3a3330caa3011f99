"""The README's Python examples run as written (the API in ten lines, the Hugging Face section)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(section: str) -> str:
    """The first ```python block after the heading ``section``."""
    start = README.index(f"## {section}\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(README, start)
    assert match is not None, f"no python block under {section!r}"
    return match.group(1)


def _run(code: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_api_in_ten_lines_trains_and_checkpoints(tmp_path):
    # compile leaves `model` at its initial weights, so the first step's loss has an unpipelined reference
    check = ("xs, ys = tokens[:, :-1].chunk(8), tokens[:, 1:].chunk(8)\n"
             "ref = sum(lm_loss(model(x), y).item() for x, y in zip(xs, ys)) / 8\n"
             "print('loss', loss, 'ref', ref, 'val', val)\n")
    out = _run("import torch\ntorch.manual_seed(0)\n" + _block("The Python API in ten lines") + check, tmp_path)
    loss, ref, val = (float(x) for x in re.search(r"loss (\S+) ref (\S+) val (\S+)", out).groups())
    assert abs(loss - ref) <= 1e-5 * ref, (loss, ref)
    assert val < loss  # one Schedule-Free step at lr 3e-3 lowers the loss on the same batch
    assert (tmp_path / "ckpt").is_dir()


def test_the_hugging_face_section_trains_exports_and_reloads(tmp_path):
    pytest.importorskip("transformers")
    code = "import torch\nimport bitpipe_fx as bp\n" + _block("Hugging Face models")
    code += "print('same', torch.allclose(logits, again(**batch).logits, atol=1e-5), 'loss', loss)\n"
    out = _run(code, tmp_path)
    assert "same True" in out, out
    assert (tmp_path / "gpt2-trained" / "config.json").is_file()
