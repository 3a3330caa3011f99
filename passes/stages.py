"""The contract between the passes and the runtime: a model cut into runnable stage modules.

Stage k is an ``nn.Module`` whose ``forward(*model_inputs_k, *inputs_k)`` returns a tuple with one
tensor per name in ``outputs_k``. Values that skip over stages are carried through the stages in
between (they appear in those stages' inputs and outputs); model inputs (tokens, attention masks,
position ids) are read directly by every stage that needs them, since every rank has the batch.
Parameter and buffer names of every stage module are the original model's FQNs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RunningStat:
    """One batch norm's running statistics in a stage: buffer FQNs and its momentum (runtime/buffers.py)."""

    mean: str
    var: str
    tracked: str | None  # its num_batches_tracked counter, when it has one
    momentum: float


@dataclass(frozen=True)
class IndexRange:
    """A model input read directly as the indices of an embedding table: its ids must lie in 0..rows-1."""

    input: str  # the flat model input's name
    rows: int  # rows of the smallest table it indexes
    table: str  # that table's FQN (the embedding weight)


@dataclass(frozen=True)
class StageSpec:
    """What stage ``index`` reads, receives, sends and holds."""

    index: int
    model_inputs: tuple[str, ...]  # flat model inputs it reads from the batch, in call order
    inputs: tuple[str, ...]  # values received from stage index-1 (empty for stage 0)
    outputs: tuple[str, ...]  # values sent to stage index+1; for the last stage, the model's flat outputs
    params: tuple[str, ...]  # original FQNs of the parameters it holds
    buffers: tuple[str, ...] = ()
    running_stats: tuple[RunningStat, ...] = ()  # batch norms that update running statistics in train mode


@dataclass
class SplitModel:
    """S runnable stages plus what is needed to feed the first and read the last."""

    stages: list[nn.Module]
    specs: tuple[StageSpec, ...]
    input_names: tuple[str, ...]  # the flat model inputs, in order
    flatten_inputs: Callable[[tuple, dict], list[torch.Tensor]]  # (args, kwargs) -> tensors in input_names order
    unflatten_output: Callable[[Sequence[torch.Tensor]], Any]  # last stage's outputs -> the model's output
    shared: dict[str, tuple[int, ...]] = field(default_factory=dict)  # FQN -> stages holding a copy (tied params)
    unused: tuple[str, ...] = ()  # parameters of the model that no stage reads (they get no gradient)
    index_ranges: tuple[IndexRange, ...] = ()  # model inputs used as embedding indices, checked on every batch

    @property
    def num_stages(self) -> int:
        return len(self.stages)


Inputs = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | dict[str, torch.Tensor]  # one model call
Targets = object  # whatever the loss reads next to the output: a pytree of tensors (split by rows), or None
LossFn = Callable[[object, Targets], torch.Tensor]  # (the model's output, targets) -> scalar loss
