"""ScheduleFree: what the Schedule-Free fronts share (train/eval switching, counters, checks), as the package does it.

In train mode a parameter holds y (where gradients are taken); ``eval()`` moves it to the
averaged iterate x = y + (1 - 1/β1)(z - y), ``train()`` back to y = x + (1 - β1)(z - x).
Call ``train()`` before the first step and ``eval()`` before evaluating or saving, exactly as
with the package. Unlike the package, a step leaves ``p.grad`` unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.kernels.engine import GroupKernel, state_dtype
from bitpipe_fx.optim.base import FusedOptimizer, check_lr, check_nonneg, check_warmup


class ScheduleFree(FusedOptimizer):
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


def check_schedule_free(group: dict[str, Any]) -> None:
    """The checks of the hyper-parameters every Schedule-Free optimizer has."""
    check_lr(group["lr"])
    check_nonneg("weight_decay", group["weight_decay"])
    check_warmup(group["warmup_steps"])
    check_nonneg("r", group["r"])
    check_nonneg("weight_lr_power", group["weight_lr_power"])


def schedule_free_inputs(group: dict[str, Any], beta1: float) -> dict[int, float]:
    """The input slots every Schedule-Free optimizer fills; β1 (or SGD's momentum) also sets the lerp weights."""
    return {S.BETA1: beta1, S.WD: group["weight_decay"], S.WARMUP: group["warmup_steps"], S.R: group["r"],
            S.WLR_POWER: group["weight_lr_power"], S.EVAL_W: 1 - 1 / beta1, S.TRAIN_W: 1 - beta1}
