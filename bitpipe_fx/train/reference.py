"""The non-pipelined reference of a run: the same model, data and optimizer in one process, no stages.

Step k computes ``for m: (loss(model(x_m), y_m) / N).backward()`` over the same N micro-batches (times the
data-parallel degree) the pipeline splits batch k into, then runs the optimizer once: DESIGN.md's numerics
contract, so its losses must match the pipelined run's to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitpipe_fx.train.data import Batches, load_corpus
from bitpipe_fx.train.job import TrainConfig, build_model, loss_fn, optimizer_factory

# relative loss agreement expected after a few optimizer steps, by dtype
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2}


def _rows(batch, n: int) -> list:
    if isinstance(batch, torch.Tensor):
        return list(batch.tensor_split(n))
    return list(zip(*(b.tensor_split(n) for b in batch)))


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
        total = 0.0
        for x, y in zip(_rows(inputs, n), _rows(targets, n)):
            args = (x,) if isinstance(x, torch.Tensor) else x
            loss = loss_fn(model(*args), y) / n
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        out.append(total)
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
    return Agreement(tuple(pipelined[:steps]), tuple(reference_losses(cfg, steps)), TOLERANCE[cfg.dtype])
