"""ScheduleFreeSGD: the torch.optim front of kernels.sf_sgd, with schedulefree.SGDScheduleFree's arguments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from bitpipe_fx.kernels import sf_sgd
from bitpipe_fx.optim.base import check_beta
from bitpipe_fx.optim.schedulefree import ScheduleFree, check_schedule_free, schedule_free_inputs


class ScheduleFreeSGD(ScheduleFree):
    """Schedule-Free SGD as schedulefree.SGDScheduleFree computes it (lr default 1.0, momentum 0.9), fused."""

    update = sf_sgd
    state_keys = ("z",)

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 *, backend: str = "auto") -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps, r=r,
                        weight_lr_power=weight_lr_power, train_mode=False)
        super().__init__(params, defaults, backend)

    def check_group(self, group: dict[str, Any]) -> None:
        check_schedule_free(group)
        check_beta("momentum", group["momentum"], low_open=True)

    def inputs(self, group: dict[str, Any]) -> dict[int, float]:
        return schedule_free_inputs(group, group["momentum"])
