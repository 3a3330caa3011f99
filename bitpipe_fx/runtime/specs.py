"""Shapes and dtypes of every boundary value, agreed once at compile time from the traced micro-batch.

Every rank runs the traced micro-batch through all stages (no grad) before it frees the stages it does not
hold, so every sender and receiver derives the same message layout without talking to each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitpipe_fx.errors import ConfigError, PipelineRuntimeError
from bitpipe_fx.passes.graph_form import buffers_kept
from bitpipe_fx.passes.stages import SplitModel
from bitpipe_fx.runtime import rng
from bitpipe_fx.runtime.precision import FP32, Precision


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor of a message."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> TensorSpec:
        return cls(tuple(t.shape), t.dtype)

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex

    def __str__(self) -> str:
        return f"{tuple(self.shape)}:{str(self.dtype).removeprefix('torch.')}"


@dataclass(frozen=True)
class BoundarySpecs:
    """``outputs[s]``: the tensors stage s sends on (its outputs); the model inputs of one micro-batch;
    ``rng``: the packed generator state that travels after the outputs (runtime.rng)."""

    model_inputs: dict[str, TensorSpec]
    outputs: tuple[tuple[TensorSpec, ...], ...]
    rng: TensorSpec

    def act(self, stage: int) -> tuple[TensorSpec, ...]:
        """Tensors of the activation message of ``stage``: its outputs, then the generator state it left."""
        return (*self.outputs[stage], self.rng)

    def grad(self, stage: int) -> tuple[TensorSpec, ...]:
        """Tensors of the gradient message of ``stage``: one per floating input (= floating output of stage-1)."""
        return tuple(t for t in self.outputs[stage - 1] if t.floating)


def check_stage_contract(split: SplitModel) -> None:
    """Every stage must receive exactly what the previous one sends (passes/stages.py contract)."""
    if split.num_stages != len(split.specs):
        raise ConfigError(f"split model has {split.num_stages} stage modules but {len(split.specs)} stage specs")
    for s in range(1, split.num_stages):
        sent, received = split.specs[s - 1].outputs, split.specs[s].inputs
        if tuple(sent) != tuple(received):
            raise ConfigError(
                f"stage {s} receives {list(received)} but stage {s - 1} sends {list(sent)}; the split must make "
                "each stage's inputs equal to the previous stage's outputs (carry skipped values through)"
            )


def trace_boundaries(split: SplitModel, flat_inputs: Sequence[torch.Tensor], precision: Precision = FP32
                     ) -> BoundarySpecs:
    """Run one micro-batch through all stages without grad and record every stage's output specs (as they
    travel under ``precision``)."""
    check_stage_contract(split)
    by_name = dict(zip(split.input_names, flat_inputs))
    received: tuple[torch.Tensor, ...] = ()
    outputs = []
    device = rng.device_of(split.stages[0])
    with torch.no_grad(), rng.preserved(device), buffers_kept(*split.stages):  # shared with the caller's model
        for stage, spec in zip(split.stages, split.specs):
            with precision.compute(device):
                out = stage(*(by_name[n] for n in spec.model_inputs), *received)
            out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            out = out if spec.index + 1 == split.num_stages else precision.wire(out)
            if len(out) != len(spec.outputs):
                raise ConfigError(
                    f"stage {spec.index} returned {len(out)} values but its spec lists {len(spec.outputs)} "
                    f"outputs {list(spec.outputs)}"
                )
            bad = [n for n, t in zip(spec.outputs, out) if not isinstance(t, torch.Tensor)]
            if bad and spec.index + 1 < split.num_stages:
                raise ConfigError(f"stage {spec.index} output(s) {bad} are not tensors; stages must send tensors")
            outputs.append(tuple(TensorSpec.of(t) for t in out if isinstance(t, torch.Tensor)))
            received = out
    return BoundarySpecs({n: TensorSpec.of(t) for n, t in by_name.items()}, tuple(outputs),
                         TensorSpec.of(rng.pack(device)))


def check_message(what: str, tensors: Sequence[torch.Tensor], want: Sequence[TensorSpec]) -> None:
    """Refuse to send a message whose tensors differ from the layout agreed at compile time."""
    got = tuple(TensorSpec.of(t) for t in tensors)
    if got != tuple(want):
        raise PipelineRuntimeError(
            f"{what} is [{', '.join(map(str, got))}] but compile time agreed on [{', '.join(map(str, want))}] "
            "from the traced micro-batch; the model's boundary shapes must depend only on the input shapes"
        )
