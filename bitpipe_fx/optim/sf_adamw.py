"""ScheduleFreeAdamW: the torch.optim front of kernels.sf_adamw, with schedulefree.AdamWScheduleFree's arguments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.kernels import sf_adamw
from bitpipe_fx.optim.base import check_beta, check_nonneg
from bitpipe_fx.optim.schedulefree import ScheduleFree, check_schedule_free, schedule_free_inputs


class ScheduleFreeAdamW(ScheduleFree):
    """Schedule-Free AdamW (Defazio et al. 2024) as schedulefree.AdamWScheduleFree computes it, in one fused pass.

    Arguments and defaults are the package's: lr, betas, eps, weight_decay (applied at y),
    warmup_steps (linear), r (polynomial averaging weight), weight_lr_power. ``backend``
    picks the implementation: 'auto' (Triton on CUDA, the torch path elsewhere), 'triton', 'torch'.
    """

    update = sf_adamw
    state_keys = ("z", "exp_avg_sq")

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, *, backend: str = "auto") -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, train_mode=False)
        super().__init__(params, defaults, backend)

    def check_group(self, group: dict[str, Any]) -> None:
        check_schedule_free(group)
        beta1, beta2 = group["betas"]
        check_beta("betas[0]", beta1, low_open=True)
        check_beta("betas[1]", beta2)
        check_nonneg("eps", group["eps"])

    def inputs(self, group: dict[str, Any]) -> dict[int, float]:
        beta1, beta2 = group["betas"]
        return {**schedule_free_inputs(group, beta1), S.BETA2: beta2, S.EPS: group["eps"]}
