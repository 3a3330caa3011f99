"""Split a step's batch into N micro-batches and refuse, before anything is sent, a batch that does not fit.

Every flat model input is split along dim 0; each micro-batch must have exactly the traced micro-batch's
shape and dtype, because message shapes were agreed from it at compile time. An input the model uses as
embedding indices must hold ids the table has (passes/input_uses.py). Targets (any pytree of tensors, or None)
are split the same way and must have as many rows as the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.passes.stages import IndexRange, Inputs, Targets
from bitpipe_fx.runtime.specs import TensorSpec


def as_call(inputs: Inputs) -> tuple[tuple, dict]:
    """(args, kwargs) of a model call from a tensor, a tuple/list of positional inputs, or a dict of kwargs."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise ConfigError(
        f"model inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(inputs).__name__}"
    )


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: flat model inputs by name, and its slice of the targets."""

    inputs: dict[str, torch.Tensor]
    target: Targets


class BatchSplitter:
    """Turns (inputs, targets) of a step into N checked micro-batches."""

    def __init__(
        self,
        input_names: Sequence[str],
        flatten_inputs: Callable[[tuple, dict], list[torch.Tensor]],
        traced: dict[str, TensorSpec],
        microbatches: int,
        index_ranges: Sequence[IndexRange] = (),
    ) -> None:
        self.input_names = tuple(input_names)
        self.flatten_inputs = flatten_inputs
        self.traced = traced
        self.n = microbatches
        self.index_ranges = {r.input: r for r in index_ranges}

    @property
    def rows(self) -> int:
        """Rows of one traced micro-batch (dim 0 of the first model input)."""
        first = self.traced[self.input_names[0]]
        return first.shape[0] if first.shape else 1

    def split(self, inputs: Inputs, targets: Targets) -> list[MicroBatch]:
        """N micro-batches; ConfigError naming the input and the fix when the batch does not fit."""
        args, kwargs = as_call(inputs)
        try:
            flat = list(self.flatten_inputs(args, kwargs))
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigError(
                f"cannot match the step's inputs to the traced model inputs {self.input_names}: {exc}"
            ) from exc
        if len(flat) != len(self.input_names):
            raise ConfigError(
                f"the step's inputs flatten to {len(flat)} tensors but the model was traced with "
                f"{len(self.input_names)} ({list(self.input_names)}); pass inputs shaped like example_inputs"
            )
        batch_rows = None
        per_name: dict[str, tuple[torch.Tensor, ...]] = {}
        for name, t in zip(self.input_names, flat):
            self._check_input(name, t)
            if name in self.index_ranges:
                check_ids(t, name, self.index_ranges[name])
            batch_rows = t.shape[0] if batch_rows is None else batch_rows
            per_name[name] = torch.tensor_split(t, self.n, dim=0)
        if batch_rows is None:
            raise ConfigError("the model has no tensor inputs to split into micro-batches")
        target_parts = self._split_targets(targets, batch_rows)
        return [
            MicroBatch({n: parts[m] for n, parts in per_name.items()}, target_parts[m]) for m in range(self.n)
        ]

    def _check_input(self, name: str, t: torch.Tensor) -> None:
        want = self.traced[name]
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"model input {name!r} is a {type(t).__name__}, expected a tensor")
        if t.dim() == 0 or t.shape[0] % self.n:
            rows = t.shape[0] if t.dim() else 0
            raise ConfigError(
                f"batch of input {name!r} has {rows} rows (shape {tuple(t.shape)}), not divisible by "
                f"microbatches={self.n}; pass a batch of {self.n} x {want.shape[0] if want.shape else 1} rows"
            )
        got = (t.shape[0] // self.n, *t.shape[1:])
        if got != tuple(want.shape) or t.dtype != want.dtype:
            raise ConfigError(
                f"micro-batch of input {name!r} would be {TensorSpec(got, t.dtype)} (batch {tuple(t.shape)} / "
                f"{self.n} micro-batches) but the pipeline was compiled for {want}; pass a batch of {self.n} "
                f"micro-batches shaped like example_inputs, or compile again with example inputs of this shape"
            )

    def _split_targets(self, targets: Targets, batch_rows: int) -> list[Targets]:
        leaves, spec = pytree.tree_flatten(targets)
        parts = []
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                parts.append([leaf] * self.n)
                continue
            if leaf.dim() == 0 or leaf.shape[0] != batch_rows:
                raise ConfigError(
                    f"targets leaf {i} has shape {tuple(leaf.shape)} but the inputs have {batch_rows} rows; "
                    "targets are split into micro-batches along dim 0 and need one row per input row"
                )
            parts.append(torch.tensor_split(leaf, self.n, dim=0))
        return [pytree.tree_unflatten([p[m] for p in parts], spec) for m in range(self.n)]


def check_ids(t: torch.Tensor, name: str, allowed: IndexRange) -> None:
    """ConfigError naming the first id of input ``name`` that is not a row of the embedding table it indexes."""
    if t.numel() == 0 or t.is_floating_point():
        return
    outside = (t < 0) | (t >= allowed.rows)
    if not bool(outside.any()):
        return
    where = tuple(int(i) for i in outside.nonzero()[0])
    value = int(t[where])
    bigger = f", or give the model a table of at least {int(t.max()) + 1} rows" if value >= allowed.rows else ""
    raise ConfigError(
        f"model input {name!r} holds id {value} at {list(where)}, but it indexes {allowed.table} with "
        f"{allowed.rows} rows (ids 0..{allowed.rows - 1}); map the data into that range (a tokenizer of this "
        f"model){bigger}"
    )
