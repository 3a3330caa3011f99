"""Checkpoints of a training run: every rank's part of the pipeline state, and the run's history.

Layout under ``OUT/checkpoint/``: ``step-000050/rank{r}.pt`` (that rank's ``pipe.state_dict()`` and RNG state)
and ``latest.json`` (the step, the config and the loss history). ``latest.json`` is replaced atomically
only after every rank has written its file, so an interrupted save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.optim.registry import OPTIMIZERS
from bitpipe_fx.train.job import TrainConfig, resume_mismatch

LATEST = "latest.json"


@dataclass
class History:
    """Per-step training loss and throughput, and (step, loss) of each validation, from step 1 on."""

    losses: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)

    @property
    def step(self) -> int:
        return len(self.losses)

    def to_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "tokens_per_s": self.tokens_per_s, "val": [list(v) for v in self.val]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls(list(d["losses"]), list(d["tokens_per_s"]), [(int(s), float(v)) for s, v in d["val"]])


def directory(out: str | Path) -> Path:
    return Path(out) / "checkpoint"


def rank_file(out: str | Path, step: int, rank: int) -> Path:
    return directory(out) / f"step-{step:06d}" / f"rank{rank}.pt"


def save_rank(out: str | Path, step: int, rank: int, state: dict[str, Any]) -> None:
    """Write one rank's state for ``step`` (call on every rank, then ``commit`` on rank 0 after a barrier)."""
    import torch

    path = rank_file(out, step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def commit(out: str | Path, step: int, cfg: TrainConfig, history: History) -> None:
    """Point ``latest.json`` at ``step`` (atomically) and delete older step folders."""
    root = directory(out)
    meta = {"step": step, "folder": f"step-{step:06d}", "config": cfg.to_dict(), "history": history.to_dict()}
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, root / LATEST)
    for old in root.glob("step-*"):
        if old.name != meta["folder"] and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def read_latest(out: str | Path) -> dict[str, Any] | None:
    """The committed checkpoint's metadata, or None when there is none."""
    path = directory(out) / LATEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); delete the checkpoint folder and start again") from exc


def check_resume(cfg: TrainConfig) -> tuple[int, History]:
    """(step, history) to continue from; ConfigError when there is no usable checkpoint for this config."""
    meta = read_latest(cfg.out)
    if meta is None:
        raise ConfigError(f"--resume: no checkpoint in {directory(cfg.out)}; run once without --resume "
                          f"(or pass the --out folder of an earlier run)")
    saved = TrainConfig.from_dict(meta["config"])
    why = resume_mismatch(saved, cfg)
    if why:
        raise ConfigError(f"--resume: {why}; resume with the same settings or use another --out folder")
    step = int(meta["step"])
    if OPTIMIZERS[cfg.optimizer].spans_run and cfg.steps != saved.steps:
        raise ConfigError(f"--resume: {cfg.optimizer}'s learning-rate profile spans the run's --steps {saved.steps}; "
                          f"resume with --steps {saved.steps}")
    if cfg.steps <= step:
        raise ConfigError(f"--resume: the checkpoint is at step {step} already; pass --steps > {step} to train on")
    for rank in range(cfg.processes):
        if not rank_file(cfg.out, step, rank).is_file():
            raise ConfigError(f"--resume: {rank_file(cfg.out, step, rank)} is missing; the checkpoint is incomplete")
    return step, History.from_dict(meta["history"])


def load_rank(out: str | Path, step: int, rank: int, device: Any = "cpu") -> dict[str, Any]:
    """One rank's saved state."""
    import torch

    return torch.load(rank_file(out, step, rank), map_location=device, weights_only=False)
