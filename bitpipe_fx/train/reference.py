"""The non-pipelined reference of a run: the same model, data and optimizer in one process, no stages.

Step k computes ``for m: (loss(model(x_m), y_m) / N).backward()`` over the same N micro-batches (times the
data-parallel degree) the pipeline splits batch k into, then runs the optimizer once: DESIGN.md's numerics
contract, so its losses must match the pipelined run's to rounding. Micro-batch m of step k draws its random
numbers (dropout) from the key of (seed, k-1, m), the rule the pipeline follows (runtime.rng).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bitpipe_fx.runtime import rng
from bitpipe_fx.train.data import Batches, load_corpus
from bitpipe_fx.train.job import TrainConfig, build_model, loss_fn, optimizer_factory

# relative loss agreement expected after a few optimizer steps, by dtype
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2}


def tolerance(cfg: TrainConfig) -> float:
    """How close the pipelined losses must be to the float reference's (bf16-mixed: as bfloat16)."""
    return TOLERANCE["bfloat16" if cfg.precision == "bf16-mixed" else cfg.dtype]


def _rows(batch, n: int) -> list:
    if isinstance(batch, torch.Tensor):
        return list(batch.tensor_split(n))
    return list(zip(*(b.tensor_split(n) for b in batch)))


def accumulate(model: nn.Module, micro_batches: Sequence[tuple[tuple[torch.Tensor, ...], Any]],
               loss_fn: Callable[[Any, Any], torch.Tensor], seed: int, step: int) -> float:
    """Non-pipelined gradient accumulation of step ``step`` (0-based): ``(loss_fn(model(*x_m), y_m) / N).backward()``
    for m in order, micro-batch m run from the key state of (seed, step, m); returns the mean loss."""
    n, total = len(micro_batches), 0.0
    device = rng.device_of(model)
    for m, (args, target) in enumerate(micro_batches):
        with rng.keyed(seed, step, m, device):
            loss = loss_fn(model(*args), target) / n
        loss.backward()
        total += float(loss.detach())
    return total


def reference_losses(cfg: TrainConfig, steps: int) -> list[float]:
    """Losses of the first ``steps`` steps of ``cfg`` trained without pipelining (on the CPU)."""
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg)
    model.train()
    optimizer = optimizer_factory(cfg)(model.parameters())
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()
    batches = Batches(load_corpus(cfg.data, cfg.max_bytes), cfg.task, cfg.batch_size, cfg.seq_len, cfg.seed)
    n = cfg.microbatches * cfg.data_parallel
    out = []
    for k in range(1, steps + 1):
        inputs, targets = batches.train(k)
        optimizer.zero_grad(set_to_none=True)
        parts = [((x,) if isinstance(x, torch.Tensor) else x, y) for x, y in zip(_rows(inputs, n), _rows(targets, n))]
        out.append(accumulate(model, parts, loss_fn, cfg.seed, k - 1))
        optimizer.step()
    return out


@dataclass(frozen=True)
class Agreement:
    """Pipelined vs reference losses over the first steps."""

    pipelined: tuple[float, ...]
    reference: tuple[float, ...]
    tolerance: float

    @property
    def max_rel_diff(self) -> float:
        return max((abs(a - b) / max(abs(b), 1e-30) for a, b in zip(self.pipelined, self.reference)), default=0.0)

    @property
    def agree(self) -> bool:
        return self.max_rel_diff <= self.tolerance

    def describe(self) -> str:
        rows = "  ".join(f"{a:.6f}/{b:.6f}" for a, b in zip(self.pipelined, self.reference))
        verdict = "agree" if self.agree else "DISAGREE"
        return (f"non-pipelined reference (same model, data and optimizer, one process), steps 1-{len(self.reference)}"
                f" pipelined/reference: {rows}\n  -> losses {verdict}: max relative difference "
                f"{self.max_rel_diff:.1e} (tolerance {self.tolerance:.0e})")


def compare(cfg: TrainConfig, pipelined: Sequence[float], steps: int) -> Agreement:
    """Run the reference for ``steps`` steps and compare with the pipelined run's first losses."""
    steps = min(steps, len(pipelined))
    return Agreement(tuple(pipelined[:steps]), tuple(reference_losses(cfg, steps)), tolerance(cfg))
