"""Pipeline state as a torch.distributed.checkpoint (DCP) folder, by original names: reshardable.

Keys: ``model.FQN`` (parameters and persistent buffers), ``optim.state.FQN.KEY`` (per-parameter optimizer
state), ``optim.param_groups`` (hyper-parameters and counters, no parameter lists) and the caller's ``extra``
objects (stored pickled, one entry each, so DCP never flattens them). Every rank saves the tensors of its
stages in parallel; DCP's planner writes a key held by several ranks (replicas of a stage, data-parallel
copies, tied parameters) once. A rank loads exactly the keys of the stages it holds now, so a checkpoint
loads under another schedule, D or data-parallel size, or into one process.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.export import deduplicated
from bitpipe_fx.runtime.chunk import StageReplica
from bitpipe_fx.runtime.state import load_model_state, load_optimizer_state, optimizer_state
from bitpipe_fx.runtime.zero import ShardedSync

MODEL, STATE, GROUPS = "model.", "optim.state.", "optim.param_groups"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process save/load, which is intended here (local runs, export)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def pack(obj: Any) -> bytes:
    """An object as one opaque checkpoint entry."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _live(replicas: Iterable[StageReplica]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(each distinct tensor of the replicas once, by its first name; alias -> first name for tied ones)."""
    state: dict[str, torch.Tensor] = {}
    for r in replicas:
        for name, t in r.module.state_dict().items():
            state.setdefault(name, t)
    kept: dict[str, torch.Tensor] = {}
    _, aliases = deduplicated(state)
    for name, t in state.items():
        if name not in aliases:
            kept[name] = t
    return kept, aliases


def flat_state(
    replicas: Iterable[StageReplica], optimizer: torch.optim.Optimizer | None, extra: Mapping[str, Any] = (),
    zero: ShardedSync | None = None,
) -> dict[str, Any]:
    """This process's part of the checkpoint, flat by key (see the module docstring); with ``zero`` (sharded
    optimizer state) the state is gathered whole per FQN first, so the checkpoint does not depend on sharding."""
    replicas = list(replicas)
    model, _ = _live(replicas)
    out: dict[str, Any] = {MODEL + k: v.detach() for k, v in model.items()}
    if optimizer is not None:
        saved = zero.optimizer_state(optimizer) if zero is not None else optimizer_state(optimizer, replicas)
        for fqn, per_param in saved["state"].items():
            for key, value in per_param.items():
                out[f"{STATE}{fqn}.{key}"] = value
        out[GROUPS] = pack([{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]])
    out.update({k: pack(v) for k, v in extra.items()})
    return out


def save(path: str | Path, replicas: Iterable[StageReplica], optimizer: torch.optim.Optimizer | None,
         extra: Mapping[str, Any] = (), zero: ShardedSync | None = None) -> None:
    """Write the checkpoint folder ``path`` (collective under torch.distributed: every rank calls it)."""
    state = flat_state(replicas, optimizer, extra, zero)
    with _quiet():
        dcp.save(state, checkpoint_id=str(path), no_dist=not _distributed())


def saved_keys(path: str | Path) -> dict[str, Any]:
    """Key -> storage metadata of the checkpoint at ``path``."""
    try:
        return dict(FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"{path} is not a readable checkpoint folder ({exc}); pass a folder written by "
                          "save_checkpoint or `bitpipe-fx train`") from exc


def _target(meta: Any) -> Any:
    if isinstance(meta, TensorStorageMetadata):
        return torch.empty(meta.size, dtype=meta.properties.dtype)
    if isinstance(meta, BytesStorageMetadata):
        return None  # replaced by the saved object
    raise ConfigError(f"checkpoint entry of type {type(meta).__name__} is not supported (sharded tensor?)")


def load(path: str | Path, replicas: Iterable[StageReplica], optimizer: torch.optim.Optimizer | None,
         extra: Iterable[str] = (), zero: ShardedSync | None = None) -> dict[str, Any]:
    """Load this process's stages (and optimizer state: with ``zero``, each piece's slice of it) from ``path``;
    returns the ``extra`` objects asked for."""
    replicas = list(replicas)
    meta = saved_keys(path)
    model, aliases = _live(replicas)
    missing = [k for k in model if MODEL + k not in meta]
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {len(missing)} tensor(s) of this model, e.g. {missing[:3]}; "
                          "load a checkpoint of the same model")
    wanted: dict[str, Any] = {MODEL + k: torch.empty_like(v, device="cpu") for k, v in model.items()}
    names = {name for r in replicas for name in r.params}
    if optimizer is not None:
        for key, m in meta.items():
            if key.startswith(STATE) and key[len(STATE):].rsplit(".", 1)[0] in names:
                wanted[key] = _target(m)
        wanted[GROUPS] = None
    for key in extra:
        if key in meta:
            wanted[key] = _target(meta[key])
    with _quiet():
        dcp.load(wanted, checkpoint_id=str(path), no_dist=not _distributed())
    state = {k: wanted[MODEL + k] for k in model}
    state.update({alias: state[first] for alias, first in aliases.items()})
    load_model_state(replicas, state)
    if optimizer is not None:
        per_param: dict[str, dict[str, Any]] = {}
        for key, value in wanted.items():
            if key.startswith(STATE):
                fqn, name = key[len(STATE):].rsplit(".", 1)
                per_param.setdefault(fqn, {})[name] = value
        load_optimizer_state(optimizer, replicas, {"state": per_param, "param_groups": unpack(wanted[GROUPS])},
                             zero.pieces if zero is not None else None)
    return {k: unpack(wanted[k]) for k in extra if k in wanted}
