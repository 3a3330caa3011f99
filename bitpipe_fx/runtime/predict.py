"""Outputs, not only losses: a forward-only pass that keeps the last stage's outputs and puts the batch together.

``PredictInterpreter`` runs the forward-only program like evaluation, but the last stage hands back its
flat outputs (the model's outputs before ``unflatten_output``) instead of a loss. ``assemble`` joins the
micro-batches' outputs as the unpipelined model would return them for the whole batch: every output with
the micro-batch's rows along dim 0 is concatenated; a 0-d output (a loss the model computes itself, e.g.
a Hugging Face model given ``labels``) is the mean over the micro-batches, which is the whole batch's value
when every micro-batch weighs the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from bitpipe_fx.errors import ConfigError, PipelineRuntimeError
from bitpipe_fx.runtime import rng
from bitpipe_fx.runtime.chunk import Chunk
from bitpipe_fx.runtime.interpreter import DeviceInterpreter
from bitpipe_fx.runtime.timeline import Recorder
from bitpipe_fx.schedules.ir import Action

FlatOutputs = tuple[torch.Tensor, ...]


class PredictInterpreter(DeviceInterpreter):
    """The forward-only interpreter whose last-stage forwards keep their outputs (``outputs[m]``)."""

    def start(self, batch: list, recorder: Recorder, keys: rng.StepKeys) -> None:
        """Reset for a forward-only pass over ``batch``."""
        self.begin(batch, 1.0, False, recorder, keys)
        self.outputs: dict[int, FlatOutputs] = {}

    def _compute(self, chunk: Chunk, a: Action, received: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        if a.kind != "F" or not chunk.last:
            return super()._compute(chunk, a, received)
        mb = self.batch[a.microbatch]
        self.outputs[a.microbatch] = chunk.outputs([mb.inputs[n] for n in chunk.spec.model_inputs], received or [])
        return None


def share(mine: Mapping[int, FlatOutputs], dp_index: int, world: int) -> dict[int, FlatOutputs]:
    """Every rank of this data-parallel pipeline gets the micro-batch outputs its last-stage ranks hold."""
    parts: list[tuple[int, dict[int, FlatOutputs]] | None] = [None] * world
    dist.all_gather_object(parts, (dp_index, dict(mine)))
    out: dict[int, FlatOutputs] = {}
    for part in parts:
        if part is not None and part[0] == dp_index:
            out.update(part[1])
    return out


def _join(i: int, parts: Sequence[Any], rows: int) -> Any:
    first = parts[0]
    if not isinstance(first, torch.Tensor):
        return first
    if all(p.dim() == 0 for p in parts):
        return torch.stack(list(parts)).mean(0)
    if all(p.dim() > 0 and p.shape[0] == rows for p in parts):
        return torch.cat(list(parts), dim=0)
    raise ConfigError(
        f"model output {i} has shape {tuple(first.shape)} per micro-batch, neither 0-d nor {rows} rows along "
        "dim 0 (the micro-batch's rows); predict() concatenates outputs along the batch dimension, so return "
        "batch-first outputs (or use evaluate() for the loss)"
    )


def assemble(
    outputs: Mapping[int, FlatOutputs], microbatches: int, rows: int, unflatten: Callable[[Sequence[Any]], Any]
) -> Any:
    """The model's output for the whole batch from every micro-batch's flat outputs."""
    missing = [m for m in range(microbatches) if m not in outputs]
    if missing:
        raise PipelineRuntimeError(f"predict got no outputs for micro-batches {missing}; the forward program "
                                   "did not run the last stage for them")
    per_mb = [outputs[m] for m in range(microbatches)]
    return unflatten([_join(i, [o[i] for o in per_mb], rows) for i in range(len(per_mb[0]))])
