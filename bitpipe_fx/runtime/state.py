"""Checkpoint state by original FQN: this process's model tensors and optimizer state.

A process can hold several copies of one FQN (replicas of a stage, or a tied parameter in two stages);
they are equal after every step, so saving takes the first and loading writes every copy. Optimizer state
is re-keyed from torch's positional indices to FQNs, and deep-copied per copy on load so copies never
share state tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypedDict

import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.runtime.chunk import StageReplica


@dataclass(frozen=True)
class Piece:
    """The part [start, stop) of parameter ``fqn`` (flattened; its shape is ``shape``) that one optimizer parameter
    is, when the optimizer state is sharded (runtime.zero): saved state is whole per FQN, a piece loads its slice."""

    fqn: str
    start: int
    stop: int
    shape: tuple[int, ...]

    def cut(self, state: Mapping[str, object]) -> dict[str, object]:
        """This piece's part of a parameter's whole saved state: per-element entries sliced, the rest copied."""
        return {k: v.reshape(-1)[self.start : self.stop].clone()
                if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) == self.shape else copy.deepcopy(v)
                for k, v in state.items()}


class OptimizerState(TypedDict):
    """``torch.optim.Optimizer.state_dict()`` with parameters named by FQN instead of by position."""

    state: dict[str, dict[str, object]]  # FQN -> the optimizer's per-parameter state (tensors, step counts)
    param_groups: list[dict[str, object]]  # hyper-parameters per group; "params" lists the group's FQNs


class PipelineState(TypedDict, total=False):
    """One process's part of a pipeline's state: tensors by FQN, and the optimizer's state when it has one."""

    model: dict[str, torch.Tensor]
    optimizer: OptimizerState


def model_state(replicas: Iterable[StageReplica]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``replicas`` by FQN (detached clones; first copy wins)."""
    out: dict[str, torch.Tensor] = {}
    for r in replicas:
        for name, value in r.module.state_dict().items():
            if name not in out:
                out[name] = value.detach().clone()
    return out


def load_model_state(replicas: Iterable[StageReplica], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into every local copy (extra keys are ignored; a missing key is a ConfigError)."""
    for r in replicas:
        wanted = r.module.state_dict().keys()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise ConfigError(
                f"state dict lacks {len(missing)} tensor(s) of stage {r.stage}, e.g. {missing[:3]}; load a state "
                "saved by a pipeline with the same model and partition (or a full_state_dict of the model)"
            )
        r.module.load_state_dict({k: state[k] for k in wanted}, strict=True)


def _param_names(replicas: Iterable[StageReplica]) -> dict[int, str]:
    return {id(p): name for r in replicas for name, p in r.params.items()}


def optimizer_state(optimizer: torch.optim.Optimizer, replicas: Iterable[StageReplica]) -> OptimizerState:
    """``optimizer.state_dict()`` with parameters named by FQN (deep copy)."""
    names = _param_names(replicas)
    sd = optimizer.state_dict()
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state: dict[str, dict[str, object]] = {}
    for index, value in sd["state"].items():
        state.setdefault(order[index], value)
    groups = []
    for g in sd["param_groups"]:
        fqns = list(dict.fromkeys(order[i] for i in g["params"]))
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": fqns})
    return copy.deepcopy(OptimizerState(state=state, param_groups=groups))


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, replicas: Iterable[StageReplica], saved: OptimizerState,
    pieces: Mapping[int, Piece] | None = None,
) -> None:
    """Inverse of ``optimizer_state``: every local copy of an FQN gets its own copy of the saved state; with
    ``pieces`` (id of an optimizer parameter -> the Piece it is: sharded state) each gets its slice."""
    pieces = pieces or {}
    names = _param_names(replicas)
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ConfigError(
            f"saved optimizer state has {len(saved['param_groups'])} parameter groups, the optimizer has "
            f"{len(optimizer.param_groups)}; build the optimizer with the same factory as the saved run"
        )
    state: dict[int, dict[str, object]] = {}
    groups = []
    index = 0
    for live, old in zip(optimizer.param_groups, saved["param_groups"]):
        indices = []
        for p in live["params"]:
            piece = pieces.get(id(p))
            fqn = piece.fqn if piece is not None else names[id(p)]
            if fqn in saved["state"]:
                whole = saved["state"][fqn]
                state[index] = piece.cut(whole) if piece is not None else copy.deepcopy(whole)
            indices.append(index)
            index += 1
        groups.append({**{k: v for k, v in old.items() if k != "params"}, "params": indices})
    optimizer.load_state_dict({"state": state, "param_groups": groups})
