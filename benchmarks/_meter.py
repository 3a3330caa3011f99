"""Counting the bytes a pipeline step keeps alive per device, for benchmarks/memory.py.

Saved tensors are counted through ``torch.autograd.graph.saved_tensors_hooks`` from pack until autograd frees
them; what the runtime keeps between actions (runtime/chunk.py's ``_Saved``, receive buffers) is passed in
after each action. Each storage counts once per device; parameters are excluded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def storage_key(t: torch.Tensor) -> tuple[int, int]:
    """(data pointer, bytes) of the storage behind ``t``: the identity and size of what it occupies."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class Live:
    """Bytes alive per device: storages with a reference count, the total, and its high-water mark."""

    def __init__(self, devices: int) -> None:
        self.refs: list[dict[int, list[int]]] = [{} for _ in range(devices)]
        self.total, self.peak = [0] * devices, [0] * devices

    def add(self, d: int, key: int, nbytes: int) -> None:
        entry = self.refs[d].setdefault(key, [nbytes, 0])
        entry[1] += 1
        if entry[1] == 1:
            self.total[d] += nbytes
            self.peak[d] = max(self.peak[d], self.total[d])

    def drop(self, d: int, key: int) -> None:
        entry = self.refs[d][key]
        entry[1] -= 1
        if entry[1] == 0:
            self.total[d] -= entry[0]
            del self.refs[d][key]


class _Packed:
    """A saved tensor with its device; the count drops when autograd frees it."""

    __slots__ = ("d", "key", "live", "tensor")

    def __init__(self, tensor: torch.Tensor, d: int, key: int, live: list[Live]) -> None:
        self.tensor, self.d, self.key, self.live = tensor, d, key, live

    def __del__(self) -> None:
        for live in self.live:
            live.drop(self.d, self.key)


class Meter:
    """Counts one step's activation bytes per device: saved tensors (``saved``) and, in ``held``, also what
    the chunks keep between actions."""

    def __init__(self, devices: int, exclude: set[int]) -> None:
        self.saved, self.held = Live(devices), Live(devices)
        self.exclude, self.device = exclude, 0
        self.kept: list[set[tuple[int, int]]] = [set() for _ in range(devices)]

    def pack(self, t: torch.Tensor) -> object:
        ptr, nbytes = storage_key(t)
        if ptr in self.exclude or nbytes == 0:
            return t
        for live in (self.saved, self.held):
            live.add(self.device, ptr, nbytes)
        # detached: a saved output holding its own grad_fn would make a cycle that outlives a split backward
        return _Packed(t.detach(), self.device, ptr, [self.saved, self.held])

    @staticmethod
    def unpack(packed: object) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Packed) else packed  # type: ignore[return-value]

    def keep(self, d: int, tensors: Iterable[torch.Tensor]) -> None:
        """After an action of device d: what its chunks hold now replaces what they held before."""
        now = {storage_key(t) for t in tensors if t.is_floating_point() and storage_key(t)[0] not in self.exclude}
        for key in now - self.kept[d]:
            self.held.add(d, *key)
        for ptr, _ in self.kept[d] - now:
            self.held.drop(d, ptr)
        self.kept[d] = now


def chunk_tensors(chunks: Iterable[Any]) -> list[torch.Tensor]:
    """Every tensor the chunks keep for pending backwards (runtime/chunk.py's _Saved)."""
    out: list[torch.Tensor] = []
    for c in chunks:
        for s in c.saved.values():
            out += [*s.leaves, *s.roots, *(s.out_grads or [])]
            if s.stash is not None:
                out += [t for t in s.stash.received if isinstance(t, torch.Tensor)]
            if s.deferred is not None:
                out += [g for grads in s.deferred.recorded.values() for g in grads if g is not None]
                out += [g for _, g in s.deferred.eager]
    return out
