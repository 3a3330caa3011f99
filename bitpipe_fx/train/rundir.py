"""The output folder of a run: whether it already holds one, and what ``--overwrite`` may remove.

A rerun into a folder that holds a run would replace its plan, metrics and pictures and (at its first save)
delete the old checkpoints, so it is refused unless the command says which it wants: ``--resume`` to
continue that run, ``--overwrite`` to replace it. Only the files a run writes are ever removed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bitpipe_fx.errors import ConfigError

# what `bitpipe-fx train` writes into --out (checkpoint/ is a folder)
RUN_FILES = ("checkpoint", "plan.json", "metrics.json", "loss.png", "timeline.png", "timeline.json")


def run_files(out: str | Path) -> list[str]:
    """The run files present in ``out`` (none when it does not exist)."""
    root = Path(out)
    return [name for name in RUN_FILES if (root / name).exists()]


def check_out(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a folder holding one, unless ``--resume`` or ``--overwrite`` says so."""
    found = run_files(out)
    if found and not (resume or overwrite):
        raise ConfigError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue it or "
                          "--overwrite to replace it (or choose another --out)")


def clear_run(out: str | Path) -> list[str]:
    """Remove the files of the run in ``out`` (``--overwrite``); returns what was removed."""
    removed = run_files(out)
    for name in removed:
        path = Path(out) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


__all__ = ["RUN_FILES", "check_out", "clear_run", "run_files"]
