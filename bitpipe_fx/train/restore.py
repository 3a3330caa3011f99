"""A run directory's trained model in this one process: the config, the latest checkpoint, the chosen weights.

The DCP checkpoint (by original names) loads into one model built from the run's config, and its optimizer
(for Schedule-Free's two sets of weights); what `bitpipe-fx export` and `sample` use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.export import mode_values
from bitpipe_fx.runtime.chunk import StageReplica
from bitpipe_fx.runtime.dcp import load
from bitpipe_fx.train import checkpoint
from bitpipe_fx.train.job import TrainConfig, build_model, optimizer_factory


@dataclass(frozen=True)
class Restored:
    """The run's config, its checkpoint's step, and the model holding the chosen weights."""

    config: TrainConfig
    step: int
    model: nn.Module


def restore(run_dir: str | Path, weights: str = "eval") -> Restored:
    """The trained model of ``run_dir`` with the weights of mode ``weights`` ("eval": Schedule-Free's x)."""
    meta = checkpoint.read_latest(run_dir)
    if meta is None:
        raise ConfigError(f"{run_dir} holds no checkpoint ({checkpoint.directory(run_dir)}/{checkpoint.LATEST} "
                          "is missing); pass the --out folder of a `bitpipe-fx train` run")
    cfg = TrainConfig.from_dict(meta["config"])
    step = int(meta["step"])
    why = checkpoint.damage(run_dir, step)
    if why:
        raise ConfigError(f"{run_dir}: the checkpoint of step {step} is damaged: {why}")
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg)
    whole = StageReplica(0, model)  # the whole model as one stage: the checkpoint is by original names
    optimizer = optimizer_factory(cfg)(whole.trainable)
    load(checkpoint.step_dir(run_dir, step), [whole], optimizer)
    values = mode_values(whole.params, optimizer, weights, training=True)  # checkpoints are saved in train mode
    with torch.no_grad():
        for name, p in whole.params.items():
            p.copy_(values[name])
            p.grad = None
    return Restored(cfg, step, model.eval())
