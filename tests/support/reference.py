"""The non-pipelined reference the numerics contract compares with, and the relative error it uses."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from bitpipe_fx.train.reference import accumulate

Rows = torch.Tensor | tuple[torch.Tensor, ...]  # a batch: one tensor, or a tuple of them (same rows)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def rows(value: Rows, n: int) -> list[Rows]:
    """A tensor or a tuple of tensors split along dim 0 into n parts."""
    if isinstance(value, torch.Tensor):
        return list(value.tensor_split(n))
    return [tuple(part) for part in zip(*(v.tensor_split(n) for v in value))]


def reference_grads(model: nn.Module, inputs: Rows, targets: Rows, n: int, loss_fn: LossFn, seed: int = 0,
                    step: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """Non-pipelined reference (train.reference.accumulate): for m, (loss_fn(model(*x_m), y_m) / n).backward()
    from micro-batch m's key state of step ``step``; returns (loss, grads by FQN)."""
    model.zero_grad(set_to_none=True)
    parts = [(xm if isinstance(xm, tuple) else (xm,), ym) for xm, ym in zip(rows(inputs, n), rows(targets, n))]
    total = accumulate(model, parts, loss_fn, seed, step)
    return total, {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max |b| (the absolute difference when b vanishes)."""
    scale = b.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The contract's optimizer: linear in the gradients, so it does not amplify rounding noise."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


@dataclass(frozen=True)
class ReferenceRun:
    """The non-pipelined run the contract compares with: first loss and gradients, parameters after the steps."""

    loss: float
    grads: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]


_REFERENCES: dict[tuple, ReferenceRun] = {}


def reference_run(model: nn.Module, loss_fn: LossFn, inputs: Rows, targets: Rows, n: int,
                  steps: int, seed: int = 0) -> ReferenceRun:
    """Reference passes over n micro-batches with ``steps`` SGD steps on a copy of ``model`` (step i keyed i);
    cached per model, batch and seed (it does not depend on the schedule)."""
    key = (id(model), n, steps, seed, *(t.data_ptr() for t in _leaves(inputs, targets)))
    if key not in _REFERENCES:
        ref = copy.deepcopy(model)
        loss, grads = reference_grads(ref, inputs, targets, n, loss_fn, seed, 0)
        opt = sgd(list(ref.parameters()))
        for i in range(steps):
            if i:
                reference_grads(ref, inputs, targets, n, loss_fn, seed, i)
            opt.step()
        _REFERENCES[key] = ReferenceRun(loss, grads, {k: p.detach().clone() for k, p in ref.named_parameters()})
    return _REFERENCES[key]


def _leaves(*values: Rows) -> list[torch.Tensor]:
    return [t for v in values for t in ((v,) if isinstance(v, torch.Tensor) else v)]
