"""Checkpoints of a training run: the pipeline's state as a DCP folder by original names, and the run's history.

Layout under ``OUT/checkpoint/``: ``step-000050/`` (a torch.distributed.checkpoint folder every rank wrote
its stages into, so it loads under another schedule, D or data-parallel size; ``meta.json``: the step, the
config and the loss history; ``manifest.json``: every file's size and SHA-256) and ``latest.json``.
A save goes to ``step-000050.partial/``; rank 0 then writes meta and manifest (temporary name, fsync,
rename), renames the folder into place and only then replaces ``latest.json``, so an interrupted save
leaves the previous checkpoint in use. The two newest steps are kept; ``--resume`` checks the manifest
before any process starts and names the last good step (``--resume-from STEP``) when a file is damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.train.job import TrainConfig, horizon_problem, resume_mismatch

LATEST, META, MANIFEST = "latest.json", "meta.json", "manifest.json"
KEEP = 2  # step folders kept: the latest and one good one before it


@dataclass
class History:
    """Per-step training loss and throughput, and (step, loss) of each validation, from step 1 on."""

    losses: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # steps whose update was dropped (--on-nonfinite skip)

    @property
    def step(self) -> int:
        return len(self.losses)

    def to_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "tokens_per_s": self.tokens_per_s, "val": [list(v) for v in self.val],
                "skipped_steps": self.skipped}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls(list(d["losses"]), list(d["tokens_per_s"]), [(int(s), float(v)) for s, v in d["val"]],
                   [int(k) for k in d.get("skipped_steps", [])])


def directory(out: str | Path) -> Path:
    return Path(out) / "checkpoint"


def step_dir(out: str | Path, step: int) -> Path:
    return directory(out) / f"step-{step:06d}"


def partial_dir(out: str | Path, step: int) -> Path:
    """Where the ranks write ``step`` before it is committed."""
    return directory(out) / f"step-{step:06d}.partial"


def rng_key(rank: int) -> str:
    return f"rng.{rank}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name, fsynced, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """name -> {"bytes", "sha256"} of every file of a step folder except the manifest itself."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def commit(out: str | Path, step: int, cfg: TrainConfig, history: History) -> None:
    """Rank 0, after every rank saved into ``partial_dir``: meta, manifest, rename, latest.json, prune."""
    root, partial, final = directory(out), partial_dir(out, step), step_dir(out, step)
    meta = {"step": step, "config": cfg.to_dict(), "history": history.to_dict()}
    write_atomic(partial / META, json.dumps(meta, indent=1))
    for p in partial.iterdir():
        _fsync(p)
    write_atomic(partial / MANIFEST, json.dumps(manifest(partial), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync(root)
    write_atomic(root / LATEST, json.dumps({"step": step, "folder": final.name}))
    for old in saved_steps(out):
        if old < step and old not in saved_steps(out)[:KEEP]:
            shutil.rmtree(step_dir(out, old), ignore_errors=True)
    for stale in root.glob("step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def read_latest(out: str | Path) -> dict[str, Any] | None:
    """The committed latest checkpoint's meta (step, config, history), or None when there is none."""
    path = directory(out) / LATEST
    if not path.is_file():
        return None
    try:
        step = int(json.loads(path.read_text())["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is damaged ({exc}); resume from an earlier step with --resume-from STEP "
                          f"(folders in {directory(out)}) or start again") from exc
    return read_meta(out, step)


def read_meta(out: str | Path, step: int) -> dict[str, Any]:
    path = step_dir(out, step) / META
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is missing or damaged ({exc}); resume from another step with "
                          f"--resume-from STEP{_good_hint(out, step)}") from exc


def damage(out: str | Path, step: int) -> str | None:
    """What is wrong with step ``step``'s files against its manifest; None when every file checks out."""
    folder = step_dir(out, step)
    try:
        want = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{folder / MANIFEST} is missing or damaged ({exc})"
    for name, entry in want.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path} has {size} bytes, the manifest says {entry['bytes']}"
        if _sha256(path) != entry["sha256"]:
            return f"{path} does not match its SHA-256 in the manifest"
    return None


def saved_steps(out: str | Path) -> list[int]:
    """Steps with a committed folder, newest first."""
    steps = []
    for p in directory(out).glob("step-*"):
        if p.is_dir() and p.name[5:].isdigit():
            steps.append(int(p.name[5:]))
    return sorted(steps, reverse=True)


def _good_hint(out: str | Path, bad: int) -> str:
    good = next((s for s in saved_steps(out) if s != bad and damage(out, s) is None), None)
    return f"; the last good checkpoint is step {good} (--resume-from {good})" if good is not None else \
        "; no other good checkpoint is left: start again without --resume"


def check_resume(cfg: TrainConfig) -> tuple[int, History]:
    """(step, history) to continue from (the latest, or ``cfg.resume_from``), verified against its manifest;
    ConfigError when unusable."""
    if cfg.resume_from is None:
        if read_latest(cfg.out) is None:
            raise ConfigError(f"--resume: no checkpoint in {directory(cfg.out)}; run once without --resume "
                              f"(or pass the --out folder of an earlier run)")
        step = int(json.loads((directory(cfg.out) / LATEST).read_text())["step"])
    else:
        step = cfg.resume_from
        if not step_dir(cfg.out, step).is_dir():
            raise ConfigError(f"--resume-from {step}: no checkpoint folder {step_dir(cfg.out, step)}; saved steps "
                              f"are {saved_steps(cfg.out) or 'none'}")
    why = damage(cfg.out, step)
    if why:
        raise ConfigError(f"--resume: the checkpoint of step {step} is damaged: {why}{_good_hint(cfg.out, step)}")
    meta = read_meta(cfg.out, step)
    saved = TrainConfig.from_dict(meta["config"])
    why = resume_mismatch(saved, cfg)
    if why:
        raise ConfigError(f"--resume: {why}; resume with the same settings or use another --out folder")
    why = horizon_problem(saved, cfg, step)
    if why:
        raise ConfigError(f"--resume: {why}")
    if cfg.steps <= step:
        raise ConfigError(f"--resume: the checkpoint is at step {step} already; pass --steps > {step} to train on")
    return step, History.from_dict(meta["history"])
