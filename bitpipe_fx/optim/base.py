"""FusedOptimizer: the torch.optim plumbing shared by the fused optimizers (groups, state, checkpoints).

A subclass says which kernel module runs its update (`update`, e.g. kernels.sf_adamw), which
per-parameter state it keeps (`state_keys`, the row slots after param and grad), which group
counters appear in its state dict, and how a group's hyper-parameters map to the scalar table's
input slots. The numerics live in bitpipe_fx.kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.kernels.engine import BACKENDS, GroupKernel, OptimizerKernel, state_dtype


def check_lr(lr: float | torch.Tensor) -> None:
    """Refuse a negative or non-finite learning rate."""
    value = float(lr)
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"lr={value} must be a finite number >= 0.")


def check_nonneg(name: str, value: float) -> None:
    """Refuse a negative or non-finite hyper-parameter."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name}={value!r} must be a finite number >= 0.")


def check_beta(name: str, value: float, low_open: bool = False) -> None:
    """Refuse a β outside [0, 1) (or (0, 1) when `low_open`: Schedule-Free divides by β1)."""
    ok = isinstance(value, (int, float)) and (0 < value < 1 if low_open else 0 <= value < 1)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ConfigError(f"{name}={value!r} must be in {interval}; the usual value is 0.9 (β1) or 0.999 (β2).")


def check_warmup(value: int) -> None:
    """Refuse a warm-up that is not a count of steps."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"warmup_steps={value!r} must be an int >= 0.")


class FusedOptimizer(torch.optim.Optimizer):
    """Base of ScheduleFreeAdamW, ScheduleFreeSGD and AdamW: one GroupKernel per param group."""

    update: OptimizerKernel
    state_keys: tuple[str, ...]
    counter_keys: tuple[str, ...]

    def __init__(self, params: Iterable, defaults: dict[str, Any], backend: str) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r} is not one of {BACKENDS}; use 'auto' unless you are testing.")
        self.backend = backend
        self._kernels: dict[int, GroupKernel] = {}
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- subclass hooks
    def check_group(self, group: dict[str, Any]) -> None:
        """Raise ConfigError for an invalid hyper-parameter of `group`."""
        raise NotImplementedError

    def inputs(self, group: dict[str, Any]) -> dict[int, float]:
        """{input slot (kernels.scalars.BETA1 .. REX_D): value} of `group`; slots left out are 0."""
        raise NotImplementedError

    def profile(self, group: dict[str, Any]) -> S.Profile:
        """Learning-rate profile of `group` (constant unless the subclass has one)."""
        return S.Profile.CONSTANT

    def counters(self, values: dict[str, float]) -> dict[str, Any]:
        """State-dict entries of a group from its device counters."""
        raise NotImplementedError

    def load_counters(self, kernel: GroupKernel, saved: dict[str, Any]) -> None:
        """Restore a group's device counters from its state-dict entries."""
        raise NotImplementedError

    # ---------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, then the fused optimizer's checks on the new group."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.check_group(group)
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ConfigError(f"a parameter of dtype {p.dtype} cannot be optimised; use floating point.")
                if p.device != group["params"][0].device:
                    raise ConfigError(
                        f"one param group holds tensors on {group['params'][0].device} and {p.device}; "
                        f"put each device's parameters in their own group (or their own optimizer)."
                    )
        except ConfigError:
            self.param_groups.pop()
            raise

    def kernel(self, index: int) -> GroupKernel:
        """The GroupKernel of group `index`, created on first use on the group's device."""
        group = self.param_groups[index]
        if index not in self._kernels:
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            self._kernels[index] = GroupKernel(self.update, self.profile(group), device, self.backend)
        kernel = self._kernels[index]
        kernel.profile = self.profile(group)
        kernel.set_inputs(self.inputs(group), group["lr"])
        return kernel

    # ---------------------------------------------------------------- the step
    def _rows(self, index: int) -> list[tuple[torch.Tensor, ...]]:
        """(param, grad, *state) of every parameter of group `index` that has a gradient; state created lazily."""
        rows = []
        keys = self.state_keys
        for p in self.param_groups[index]["params"]:
            grad = p.grad
            if grad is None:
                continue
            state = self.state[p]
            if not state:
                self.init_state(p, state)
            rows.append((p, grad, *[state[k] for k in keys]))
        return rows

    def _names_with_grad(self, index: int) -> list[str]:
        """Names of the parameters of group `index` that have a gradient, in _rows order (for error messages)."""
        group = self.param_groups[index]
        names = group.get("param_names") or [f"param_groups[{index}].params[{j}]" for j in range(len(group["params"]))]
        return [name for name, p in zip(names, group["params"]) if p.grad is not None]

    def init_state(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Zero state in the state dtype (subclasses override what is not zero)."""
        for key in self.state_keys:
            state[key] = torch.zeros_like(p, dtype=state_dtype(p.dtype), memory_format=torch.preserve_format)

    def check_step(self) -> None:
        """Raise before a step that must not run (Schedule-Free in eval mode)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One fused step of every param group; never synchronises with the host on the Triton path."""
        self.check_step()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index in range(len(self.param_groups)):
            self.kernel(index).step(self._rows(index), lambda index=index: self._names_with_grad(index))
        return loss

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus each group's counters as host numbers (this reads the device once)."""
        sd = super().state_dict()
        for index, packed in enumerate(sd["param_groups"]):
            values = self.kernel(index).read()
            packed.update(self.counters(values))
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load groups and state; state tensors keep the state dtype (float32 for bf16 parameters)."""
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            if saved_id in saved_state:
                self.state[p] = {
                    k: v.detach().to(device=p.device, dtype=state_dtype(p.dtype), copy=True)
                    for k, v in saved_state[saved_id].items()
                    if k in self.state_keys
                }
        self._kernels.clear()
        for index, group in enumerate(self.param_groups):
            saved = {k: group.pop(k) for k in self.counter_keys if k in group}
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self.check_group(group)
            self.load_counters(self.kernel(index), saved)
