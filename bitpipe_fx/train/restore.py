"""A run directory's trained model in this one process: the config, the latest checkpoint, the chosen weights.

Every rank's saved part is merged by original parameter name into one model built from the run's config
(and its optimizer, for Schedule-Free's two sets of weights); what `bitpipe-fx export` and `sample` use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.export import deduplicated, mode_values
from bitpipe_fx.runtime.chunk import StageReplica
from bitpipe_fx.runtime.state import load_model_state, load_optimizer_state
from bitpipe_fx.train import checkpoint
from bitpipe_fx.train.job import TrainConfig, build_model, optimizer_factory


@dataclass(frozen=True)
class Restored:
    """The run's config, its checkpoint's step, and the model holding the chosen weights."""

    config: TrainConfig
    step: int
    model: nn.Module


def merged_state(out: str | Path, step: int, processes: int) -> dict[str, Any]:
    """Every rank's {"model", "optimizer"} part of ``step`` merged by FQN (copies of one FQN are equal)."""
    model: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    for rank in range(processes):
        part = checkpoint.load_rank(out, step, rank)["pipe"]
        for k, v in part["model"].items():
            model.setdefault(k, v)
        if "optimizer" in part:
            for k, v in part["optimizer"]["state"].items():
                state.setdefault(k, v)
            groups = groups or part["optimizer"]["param_groups"]
    return {"model": model, "optimizer": {"state": state, "param_groups": groups}}


def restore(run_dir: str | Path, weights: str = "eval") -> Restored:
    """The trained model of ``run_dir`` with the weights of mode ``weights`` ("eval": Schedule-Free's x)."""
    meta = checkpoint.read_latest(run_dir)
    if meta is None:
        raise ConfigError(f"{run_dir} holds no checkpoint ({checkpoint.directory(run_dir)}/{checkpoint.LATEST} "
                          "is missing); pass the --out folder of a `bitpipe-fx train` run")
    cfg = TrainConfig.from_dict(meta["config"])
    step = int(meta["step"])
    saved = merged_state(run_dir, step, cfg.processes)
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg)
    whole = StageReplica(0, model)  # the whole model as one stage: the state functions key it by FQN
    _, aliases = deduplicated(model.state_dict())
    load_model_state([whole], {**saved["model"], **{a: saved["model"][n] for a, n in aliases.items()
                                                   if n in saved["model"]}})
    optimizer = optimizer_factory(cfg)(whole.trainable)
    if saved["optimizer"]["param_groups"]:
        load_optimizer_state(optimizer, [whole], saved["optimizer"])
    values = mode_values(whole.params, optimizer, weights, training=True)  # checkpoints are saved in train mode
    with torch.no_grad():
        for name, p in whole.params.items():
            p.copy_(values[name])
            p.grad = None
    return Restored(cfg, step, model.eval())
