"""AdamW: the torch.optim front of kernels.adamw, its learning-rate profile computed on the device (no host sync)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.kernels import adamw
from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.kernels.engine import GroupKernel
from bitpipe_fx.optim.base import FusedOptimizer, check_beta, check_lr, check_nonneg
from bitpipe_fx.optim.lr import LRProfile


class AdamW(FusedOptimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction), fused, with a device-side lr profile.

    ``lr`` is the peak learning rate; ``lr_profile`` is an :class:`LRProfile` or the name of one
    ('constant', 'linear', 'cosine', 'rex') completed by ``total_steps``, ``warmup_steps``,
    ``min_lr`` and ``rex_d``. Step index k runs at ``LRProfile.lr(k, lr)``: the same numbers as
    torch.optim.AdamW driven by a LambdaLR with that profile. The step count is per group, so a
    parameter whose first gradient arrives late gets the group's bias correction, as if its moments
    had been accumulating zeros (torch keeps a count per parameter).
    """

    update = adamw
    state_keys = ("exp_avg", "exp_avg_sq")
    counter_keys = ("step", "scheduled_lr")

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, lr_profile: LRProfile | str = "constant", *,
                 total_steps: int | None = None, warmup_steps: int = 0, min_lr: float = 0.0, rex_d: float = 0.5,
                 backend: str = "auto") -> None:
        if isinstance(lr_profile, str):
            lr_profile = LRProfile(lr_profile, total_steps, warmup_steps, min_lr, rex_d)
        elif not isinstance(lr_profile, LRProfile):
            raise ConfigError(f"lr_profile={lr_profile!r} must be an LRProfile or one of its kinds' names.")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lr_profile=lr_profile.kind,
                        total_steps=lr_profile.total_steps, warmup_steps=lr_profile.warmup_steps,
                        min_lr=lr_profile.min_lr, rex_d=lr_profile.d)
        super().__init__(params, defaults, backend)

    @staticmethod
    def group_profile(group: dict[str, Any]) -> LRProfile:
        """The profile a group runs (validated)."""
        return LRProfile(group["lr_profile"], group["total_steps"], group["warmup_steps"], group["min_lr"],
                         group["rex_d"])

    def check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        beta1, beta2 = group["betas"]
        check_beta("betas[0]", beta1)
        check_beta("betas[1]", beta2)
        check_nonneg("eps", group["eps"])
        check_nonneg("weight_decay", group["weight_decay"])
        self.group_profile(group).check_base(float(group["lr"]))

    def profile(self, group: dict[str, Any]) -> S.Profile:
        return self.group_profile(group).code

    def inputs(self, group: dict[str, Any]) -> dict[int, float]:
        beta1, beta2 = group["betas"]
        return {S.BETA1: beta1, S.BETA2: beta2, S.EPS: group["eps"], S.WD: group["weight_decay"],
                S.WARMUP: group["warmup_steps"], S.TOTAL: group["total_steps"] or 0, S.MIN_LR: group["min_lr"],
                S.REX_D: group["rex_d"]}

    def counters(self, values: dict[str, float]) -> dict[str, Any]:
        return {"step": values["k"], "scheduled_lr": values["scheduled_lr"]}

    def load_counters(self, kernel: GroupKernel, saved: dict[str, Any]) -> None:
        kernel.load_state(float(saved.get("step", 0)), -1.0, 0.0, float(saved.get("scheduled_lr", 0.0)))
