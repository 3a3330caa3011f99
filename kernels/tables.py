"""Pointer tables: how one kernel launch reaches every tensor of a parameter group.

A table holds, for n tensors and a few *slots* (parameter, gradient, state...), the int64
offset in elements of every tensor in every slot from that slot's *base* (a one-element tensor
of the slot's dtype, passed to the kernel as a typed pointer), each tensor's element count, and
a block map that sends program ``pid`` to its tensor and to its int64 offset inside it.
Offsets rather than raw addresses keep the pointer arithmetic in the compiler's view: the
alignment it can prove for base + offset is what turns full blocks into vector accesses. Tables are rebuilt
only when an address changes (a new gradient tensor, a loaded state dict), and uploaded
with a non-blocking copy from pinned memory, so a step never waits for the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bitpipe_fx.errors import ConfigError

ALIGN = 16  # bytes: what vector loads need, and what the ALIGNED kernels assume


@dataclass(frozen=True)
class TensorTable:
    """Element offsets and block map of n tensors in `len(bases)` slots, on one device."""

    offsets: torch.Tensor  # int64 [slots * n], slot-major: element offset of tensor i in slot s from bases[s]
    block_tensor: torch.Tensor  # int32 [n_blocks]: tensor of each program
    first_block: torch.Tensor  # int64 [n]: first program of each tensor
    numels: torch.Tensor  # int64 [n]
    n: int
    n_blocks: int
    block: int
    aligned: bool  # every address (bases included) is a multiple of ALIGN bytes
    bases: tuple[torch.Tensor, ...]  # one tiny tensor per slot: the origin of its offsets, and its dtype


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without blocking the host or waiting on the stream."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill a contiguous range of memory (any dimension order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _walk_order(t: torch.Tensor) -> list[int]:
    """Strides of the dimensions that matter (size > 1): equal walk orders mean equal flat element order."""
    return [stride for size, stride in zip(t.shape, t.stride()) if size > 1]


def check_row(name: str, row: Sequence[torch.Tensor]) -> None:
    """Refuse a parameter whose tensors cannot be walked as one flat range each, in the same order."""
    first = row[0]
    if row[1].layout != torch.strided:
        raise ConfigError(f"{name}: sparse gradients are not supported; use dense gradients.")
    for t in row:
        if t.shape != first.shape or _walk_order(t) != _walk_order(first) or not is_dense(t):
            raise ConfigError(
                f"{name}: the fused optimizer needs the parameter, its gradient and its state to be dense "
                f"with the same strides; got shapes {[tuple(x.shape) for x in row]} and strides "
                f"{[x.stride() for x in row]}. Make the parameter contiguous (p.data = p.data.contiguous()) "
                f"or use backend='torch'."
            )


_BASES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _base(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A live one-element tensor per (device, dtype): freshly allocated, so ALIGN-aligned."""
    key = (device, dtype)
    if key not in _BASES:
        _BASES[key] = torch.empty(1, dtype=dtype, device=device)
    return _BASES[key]


def build_table(rows: Sequence[Sequence[torch.Tensor]], block: int, names: Sequence[str]) -> TensorTable:
    """Table over `rows` (one row of slot tensors per parameter, named by `names` in errors); same dtypes and device."""
    for name, row in zip(names, rows):
        check_row(name, row)
    device = rows[0][0].device
    n, slots = len(rows), len(rows[0])
    numels = [r[0].numel() for r in rows]
    blocks = [max(1, -(-m // block)) for m in numels]
    first = [0] * n
    for i in range(1, n):
        first[i] = first[i - 1] + blocks[i - 1]
    bases = tuple(_base(device, t.dtype) for t in rows[0])
    addresses = [rows[i][s].data_ptr() for s in range(slots) for i in range(n)]
    offsets = []
    for index, address in enumerate(addresses):
        base = bases[index // n]
        distance = address - base.data_ptr()
        if distance % base.element_size():
            raise ConfigError(
                f"{names[index % n]}: address {address:#x} is not a multiple of its element size "
                f"{base.element_size()}; the fused optimizer cannot address it. Use backend='torch'."
            )
        offsets.append(distance // base.element_size())
    block_tensor = torch.repeat_interleave(torch.arange(n, dtype=torch.int32), torch.tensor(blocks))
    return TensorTable(
        offsets=_upload(torch.tensor(offsets, dtype=torch.int64), device),
        block_tensor=_upload(block_tensor, device),
        first_block=_upload(torch.tensor(first, dtype=torch.int64), device),
        numels=_upload(torch.tensor(numels, dtype=torch.int64), device),
        n=n,
        n_blocks=sum(blocks),
        block=block,
        aligned=all(a % ALIGN == 0 for a in (*addresses, *(b.data_ptr() for b in bases))),
        bases=bases,
    )


class TableCache:
    """Keeps the last table of one bucket and rebuilds it only when an address or a size changes."""

    def __init__(self, block: int) -> None:
        self.block = block
        self._key: tuple[int, ...] | None = None
        self._table: TensorTable | None = None

    def get(self, rows: Sequence[Sequence[torch.Tensor]], key: tuple[int, ...], names: Sequence[str]) -> TensorTable:
        """Table for `rows`; `key` is every address and size of the rows (the caller computed it anyway)."""
        if key != self._key or self._table is None:
            self._table = build_table(rows, self.block, names)
            self._key = key
        return self._table
