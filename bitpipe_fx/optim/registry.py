"""The optimizers by name: what ``--optimizer`` accepts, and the one line a new optimizer adds.

The registry names each front by import path, as train.job names models, so that reading it
(the CLI's argument parsing and config checks) imports no torch; ``Registered.front()`` imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the base class imports torch, which reading the registry must not
    from bitpipe_fx.optim.base import FusedOptimizer


@dataclass(frozen=True)
class Registered:
    """A front class ("module:Class"), the lr a run uses when none is given, and arguments the name fixes."""

    path: str
    default_lr: float
    options: tuple[tuple[str, str], ...] = ()  # e.g. (("lr_profile", "rex"),)
    spans_run: bool = False  # its lr profile ends at the run's last step, so it is given total_steps

    def front(self) -> type[FusedOptimizer]:
        """The torch.optim class (imported on first use)."""
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name)

    def build(self, params: Iterable, *, lr: float, warmup_steps: int, weight_decay: float,
              total_steps: int) -> FusedOptimizer:
        """The optimizer for a run of `total_steps` steps with these settings."""
        extra = {"total_steps": total_steps} if self.spans_run else {}
        return self.front()(params, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay,
                            **dict(self.options), **extra)


OPTIMIZERS: dict[str, Registered] = {
    "sf-adamw": Registered("bitpipe_fx.optim.sf_adamw:ScheduleFreeAdamW", default_lr=3e-3),
    "sf-sgd": Registered("bitpipe_fx.optim.sf_sgd:ScheduleFreeSGD", default_lr=0.5),
    "adamw-rex": Registered("bitpipe_fx.optim.adamw:AdamW", default_lr=3e-3, options=(("lr_profile", "rex"),),
                            spans_run=True),
}
