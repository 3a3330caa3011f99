"""GroupKernel: one parameter group's device scalars, launch tables and backend, behind two calls.

The optimizers in :mod:`bitpipe_fx.optim` own the torch.optim plumbing (param groups, state
dicts, validation); a GroupKernel owns the numerics of one group: ``step(rows)`` advances the
group's scalars and updates every row (parameter, gradient, state tensors) with the update of
the optimizer's kernel module (an :class:`OptimizerKernel`: kernels/sf_adamw.py and its
siblings), ``lerp(rows, slot)`` moves Schedule-Free parameters between y and x. Nothing here
knows one optimizer from another.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.kernels import lang
from bitpipe_fx.kernels import lerp as L
from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.kernels.tables import TableCache

DEFAULT_BLOCK = 4096
DEFAULT_NUM_WARPS = 8
BACKENDS = ("auto", "triton", "torch")

Row = Sequence[torch.Tensor]
Names = Callable[[], Sequence[str]]  # parameter names for error messages, computed only when needed


class Launchable(Protocol):
    """A @triton.jit kernel: ``kernel[grid](*args, **constexprs, num_warps=...)``."""

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]: ...


class OptimizerKernel(Protocol):
    """What GroupKernel needs of an optimizer's kernel module; the module itself satisfies it."""

    # (s, PROFILE): one program advances the slot table for this step
    scalar_kernel: Launchable
    # (offsets, n, block_tensor, first_block, numels, s, y_base, g_base, state_base, ALIGNED, BLOCK):
    # one BLOCK of one row per program
    step_kernel: Launchable

    def advance(self, profile: S.Profile, slots: Sequence[float]) -> list[float]:
        """Host twin of scalar_kernel: the slot values after one step."""
        ...

    def torch_update(self, lists: Sequence[list[torch.Tensor]], s: Sequence[float]) -> None:
        """CPU path: update per-slot lists of same-dtype tensors in place with this step's slot values `s`."""
        ...


def _no_names() -> Sequence[str]:
    return ()


def triton_available() -> bool:
    """True when triton imports (it is an optional extra)."""
    return lang.triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`: auto picks Triton on CUDA, the torch path elsewhere.

    Under the Triton interpreter (TRITON_INTERPRET=1, as in the test suite) the kernels can only
    address host memory, so auto picks the torch path for CUDA tensors too.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not one of {BACKENDS}; use 'auto' unless you are testing.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and not _interpreting() and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ConfigError("backend='triton' needs the triton package: pip install 'bitpipe-fx[kernels]'.")
        if device.type == "cuda" and _interpreting():
            raise ConfigError(
                "backend='triton' on CUDA tensors cannot run under the Triton interpreter (TRITON_INTERPRET=1 "
                "reads host memory only): unset TRITON_INTERPRET before triton is imported, or use backend='auto'."
            )
        if device.type != "cuda" and not _interpreting():
            raise ConfigError(
                f"backend='triton' on {device.type} tensors runs only under the Triton interpreter: set "
                f"TRITON_INTERPRET=1 before triton is imported, or use backend='auto'."
            )
    return backend


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Optimizer state dtype for parameters of `dtype`: float64 stays, everything else gets float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class GroupKernel:
    """Scalars (float64 slots on the group's device), tables and launches of one parameter group."""

    def __init__(self, update: OptimizerKernel, profile: S.Profile, device: torch.device, backend: str,
                 block: int = DEFAULT_BLOCK, num_warps: int = DEFAULT_NUM_WARPS) -> None:
        self.update, self.profile, self.device = update, profile, device
        self.backend = resolve_backend(backend, device)
        self.block, self.num_warps = block, num_warps
        self.slots = torch.zeros(S.N_SLOTS, dtype=torch.float64, device=device)
        self.load_state(*S.INITIAL_STATE)
        self._inputs: tuple[float, ...] | None = None
        self._tables: dict[tuple, TableCache] = {}
        self._last: dict[str, tuple[tuple[int, ...], list]] = {}  # purpose -> (every address, tables)

    # ----------------------------------------------------------------- host <-> device scalars
    def set_inputs(self, inputs: Mapping[int, float], lr: float | torch.Tensor) -> None:
        """Write the hyper-parameters ({input slot: value}, others 0) when they changed; a tensor lr is copied."""
        unknown = [slot for slot in inputs if not S.LR < slot < S.N_INPUTS]
        if unknown:
            raise ConfigError(f"slots {unknown} are not hyper-parameter slots; use scalars.BETA1 .. scalars.REX_D.")
        lr_value = 0.0 if isinstance(lr, torch.Tensor) else float(lr)
        values = (lr_value, *(float(inputs.get(slot, 0.0)) for slot in range(S.LR + 1, S.N_INPUTS)))
        if values != self._inputs:
            host = torch.tensor(values, dtype=torch.float64)
            if self.device.type == "cuda":
                host = host.pin_memory()
            self.slots[: S.N_INPUTS].copy_(host, non_blocking=True)
            self._inputs = values
        if isinstance(lr, torch.Tensor):
            self.slots[S.LR : S.LR + 1].copy_(lr.detach().reshape(1), non_blocking=True)

    def load_state(self, k: float, lr_max: float, weight_sum: float, scheduled_lr: float = 0.0) -> None:
        """Set step count, lr_max, weight sum and the last scheduled lr (after load_state_dict)."""
        self.slots[S.K : S.WSUM + 1].copy_(torch.tensor([k, lr_max, weight_sum], dtype=torch.float64))
        self.slots[S.GAMMA] = scheduled_lr

    def read(self) -> dict[str, float]:
        """Step count, lr_max, weight sum and last scheduled lr as host numbers (synchronises: checkpoints only)."""
        s = self.slots.tolist()
        return {"k": int(s[S.K]), "lr_max": s[S.LR_MAX], "weight_sum": s[S.WSUM], "scheduled_lr": s[S.GAMMA]}

    # ----------------------------------------------------------------- the step
    def step(self, rows: Sequence[Row], names: Names = _no_names) -> None:
        """Advance the scalars once and update every row (param, grad, *state) with the optimizer's update."""
        if self.backend == "torch":
            self._torch_step(rows, names)
            return
        with _on(self.device):
            self._triton_step(rows, names)

    def lerp(self, rows: Sequence[Row], w_slot: int) -> None:
        """y <- y + w·(z - y) on every (y, z) row, w read from slot `w_slot` (EVAL_W or TRAIN_W)."""
        if not rows:
            return
        if self.backend == "torch":
            w = self.slots[w_slot].item()
            for (ys, zs), low in _buckets(rows):
                L.torch_lerp(ys, zs, w)
                _store_back(low, ys)
            return
        with _on(self.device):
            self._triton_lerp(rows, w_slot)

    def _triton_lerp(self, rows: Sequence[Row], w_slot: int) -> None:
        for table in self._tables_for(rows, "lerp", _no_names):
            L.lerp_kernel[(table.n_blocks,)](
                table.offsets, table.n, table.block_tensor, table.first_block, table.numels, self.slots,
                table.bases[0], table.bases[1], W_SLOT=w_slot, ALIGNED=table.aligned, BLOCK=table.block,
                num_warps=self.num_warps,
            )

    def _torch_step(self, rows: Sequence[Row], names: Names) -> None:
        for i, row in enumerate(rows):
            if row[1].layout != torch.strided:
                raise ConfigError(f"{_name(names(), i)}: sparse gradients are not supported; use dense gradients.")
        s = self.update.advance(self.profile, self.slots.tolist())
        self.slots.copy_(torch.tensor(s, dtype=torch.float64))
        for lists, low in _buckets(rows):
            self.update.torch_update(lists, s)
            _store_back(low, lists[0])

    def _triton_step(self, rows: Sequence[Row], names: Names) -> None:
        self.update.scalar_kernel[(1,)](self.slots, PROFILE=int(self.profile), num_warps=1)
        if not rows:
            return
        for table in self._tables_for(rows, "step", names):
            # state slots share one dtype, so bases[2] is the base of every state slot
            self.update.step_kernel[(table.n_blocks,)](
                table.offsets, table.n, table.block_tensor, table.first_block, table.numels, self.slots,
                *table.bases[:3], ALIGNED=table.aligned, BLOCK=table.block, num_warps=self.num_warps,
            )

    def _tables_for(self, rows: Sequence[Row], purpose: str, names: Names) -> list:
        """Tables for `rows`; when no address changed since the last call, the last tables, found in one compare."""
        addresses = tuple([t.data_ptr() for row in rows for t in row])
        last = self._last.get(purpose)
        if last is not None and last[0] == addresses:
            return last[1]
        tables = self._bucket_tables(rows, purpose, names())
        self._last[purpose] = (addresses, tables)
        return tables

    def _bucket_tables(self, rows: Sequence[Row], purpose: str, names: Sequence[str]) -> list:
        """One table per (dtypes, alignment) bucket of `rows`, cached by addresses and sizes."""
        buckets: dict[tuple, tuple[list[Row], list[str], list[int]]] = {}
        for i, row in enumerate(rows):
            ptrs = [t.data_ptr() for t in row]
            key = (purpose, *(t.dtype for t in row), all(p % 16 == 0 for p in ptrs))
            bucket_rows, bucket_names, bucket_key = buckets.setdefault(key, ([], [], []))
            bucket_rows.append(row)
            bucket_names.append(_name(names, i))
            bucket_key.extend(ptrs)
            bucket_key.append(row[0].numel())
        tables = []
        for key, (bucket_rows, bucket_names, bucket_key) in buckets.items():
            cache = self._tables.setdefault(key, TableCache(self.block))
            tables.append(cache.get(bucket_rows, tuple(bucket_key), bucket_names))
        return tables


def _name(names: Sequence[str], i: int) -> str:
    return names[i] if i < len(names) else f"parameter {i}"


def _on(device: torch.device):
    """Launch context: Triton launches on the current CUDA device, so make it the group's."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _buckets(rows: Sequence[Row]):
    """Group rows by dtypes for the multi-tensor ops; low-precision tensors come back as state-dtype copies.

    Yields (lists per slot in the state dtype, original parameter tensors that need the result copied back).
    """
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(t.dtype for t in row), []).append(row)
    for bucket in groups.values():
        cdt = bucket[0][-1].dtype  # the last slot is always optimizer state
        lists = [[t if t.dtype == cdt else t.to(cdt) for t in col] for col in zip(*bucket)]
        low = [row[0] for row in bucket] if bucket[0][0].dtype != cdt else []
        yield lists, low


def _store_back(low: list[torch.Tensor], computed: list[torch.Tensor]) -> None:
    """Round the state-dtype results back into low-precision parameters (nearest-even, as Triton stores)."""
    if low:
        torch._foreach_copy_(low, computed)
