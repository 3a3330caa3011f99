"""Schedule-Free AdamW and SGD with the ``schedulefree`` package's arguments and semantics, fused.

In train mode a parameter holds y (where gradients are taken); ``eval()`` moves it to the
averaged iterate x = y + (1 - 1/β1)(z - y), ``train()`` back to y = x + (1 - β1)(z - x).
Call ``train()`` before the first step and ``eval()`` before evaluating or saving, exactly as
with the package. Unlike the package, a step leaves ``p.grad`` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.kernels.engine import GroupKernel, state_dtype
from bitpipe_fx.optim.base import FusedOptimizer, check_beta, check_lr, check_nonneg, check_warmup


class _ScheduleFree(FusedOptimizer):
    """train()/eval() switching, the eval-mode guard and the package's state-dict counters."""

    counter_keys = ("k", "lr_max", "weight_sum", "scheduled_lr")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """New groups start in the mode of the existing ones (their parameters have no z yet)."""
        if self.param_groups:
            param_group = {**param_group, "train_mode": self.param_groups[0]["train_mode"]}
        super().add_param_group(param_group)

    def init_state(self, p: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """z starts at the parameter (y), v at zero, as in the package."""
        state["z"] = p.detach().to(state_dtype(p.dtype), copy=True, memory_format=torch.preserve_format)
        if "exp_avg_sq" in self.state_keys:
            state["exp_avg_sq"] = torch.zeros_like(state["z"])

    def check_step(self) -> None:
        for index, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise ConfigError(
                    f"{type(self).__name__}.step() called while param group {index} is in eval mode: the "
                    f"parameters hold the averaged x, not y. Call optimizer.train() before training steps "
                    f"(and optimizer.eval() before evaluating or saving)."
                )

    @torch.no_grad()
    def _switch(self, to_train: bool) -> None:
        for index, group in enumerate(self.param_groups):
            if group["train_mode"] == to_train:
                continue
            rows = [(p, self.state[p]["z"]) for p in group["params"] if "z" in self.state[p]]
            self.kernel(index).lerp(rows, S.TRAIN_W if to_train else S.EVAL_W)
            group["train_mode"] = to_train

    @torch.no_grad()
    def mode_weights(self, train: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, copy of its value in train (y) or eval (x) mode): the same lerp as train()/eval(), on
        copies, so neither the parameters nor the optimizer change (export reads either set of weights)."""
        out = []
        for index, group in enumerate(self.param_groups):
            rows = [(p, p.detach().clone()) for p in group["params"]]
            moving = [(copy, self.state[p]["z"]) for p, copy in rows if "z" in self.state[p]]
            if group["train_mode"] != train:
                self.kernel(index).lerp(moving, S.TRAIN_W if train else S.EVAL_W)
            out.extend(rows)
        return out

    def train(self) -> None:
        """Parameters to y (the point where gradients are taken); required before step()."""
        self._switch(True)

    def eval(self) -> None:
        """Parameters to x (the averaged iterate): evaluate and checkpoint in this mode."""
        self._switch(False)

    def counters(self, values: dict[str, float]) -> dict[str, Any]:
        return {key: values[key] for key in self.counter_keys}

    def load_counters(self, kernel: GroupKernel, saved: dict[str, Any]) -> None:
        kernel.load_state(float(saved.get("k", 0)), float(saved.get("lr_max", -1.0)),
                          float(saved.get("weight_sum", 0.0)), float(saved.get("scheduled_lr", 0.0)))


def _check_common(group: dict[str, Any]) -> None:
    check_lr(group["lr"])
    check_nonneg("weight_decay", group["weight_decay"])
    check_warmup(group["warmup_steps"])
    check_nonneg("r", group["r"])
    check_nonneg("weight_lr_power", group["weight_lr_power"])


class ScheduleFreeAdamW(_ScheduleFree):
    """Schedule-Free AdamW (Defazio et al. 2024) as schedulefree.AdamWScheduleFree computes it, in one fused pass.

    Arguments and defaults are the package's: lr, betas, eps, weight_decay (applied at y),
    warmup_steps (linear), r (polynomial averaging weight), weight_lr_power. ``backend``
    picks the implementation: 'auto' (Triton on CUDA, the torch path elsewhere), 'triton', 'torch'.
    """

    kind = S.Kind.SF_ADAMW
    state_keys = ("z", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, *, backend: str = "auto") -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, train_mode=False)
        super().__init__(params, defaults, backend)

    def check_group(self, group: dict[str, Any]) -> None:
        _check_common(group)
        beta1, beta2 = group["betas"]
        check_beta("betas[0]", beta1, low_open=True)
        check_beta("betas[1]", beta2)
        check_nonneg("eps", group["eps"])

    def inputs(self, group: dict[str, Any]) -> list[float]:
        beta1, beta2 = group["betas"]
        return [beta1, beta2, group["eps"], group["weight_decay"], group["warmup_steps"], group["r"],
                group["weight_lr_power"], 1 - 1 / beta1, 1 - beta1, 0.0, 0.0, 0.0]


class ScheduleFreeSGD(_ScheduleFree):
    """Schedule-Free SGD as schedulefree.SGDScheduleFree computes it (lr default 1.0, momentum 0.9), fused."""

    kind = S.Kind.SF_SGD
    state_keys = ("z",)

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 *, backend: str = "auto") -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, train_mode=False)
        super().__init__(params, defaults, backend)

    def check_group(self, group: dict[str, Any]) -> None:
        _check_common(group)
        check_beta("momentum", group["momentum"], low_open=True)

    def inputs(self, group: dict[str, Any]) -> list[float]:
        m = group["momentum"]
        return [m, 0.0, 0.0, group["weight_decay"], group["warmup_steps"], group["r"], group["weight_lr_power"],
                1 - 1 / m, 1 - m, 0.0, 0.0, 0.0]
