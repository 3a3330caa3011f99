"""Learning-rate profiles: LRProfile (what AdamW computes on the device) and REX (the same as an LRScheduler)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.kernels.scalars import Profile, profile_lr

PROFILES = tuple(p.name.lower() for p in Profile)


@dataclass(frozen=True)
class LRProfile:
    """Linear warm-up over `warmup_steps` steps, then `kind` from the base lr down to `min_lr` at `total_steps`.

    Step index k (0-based) runs at base·(k+1)/warmup_steps during warm-up (never at lr 0), then at
    min_lr + (base - min_lr)·shape(z) with z = (k - warmup_steps) / (total_steps - warmup_steps) clamped
    to [0, 1]; shape is 1 (constant), 1-z (linear), (1+cos πz)/2 (cosine) or (1-z)/(1-d·z) (rex).
    """

    kind: str = "constant"
    total_steps: int | None = None
    warmup_steps: int = 0
    min_lr: float = 0.0
    d: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in PROFILES:
            raise ConfigError(f"lr profile {self.kind!r} is unknown; use one of {PROFILES}.")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r} must be an int >= 0.")
        if self.kind != "constant" and (
            not isinstance(self.total_steps, int) or self.total_steps <= self.warmup_steps
        ):
            raise ConfigError(
                f"lr profile {self.kind!r} needs total_steps (an int) greater than warmup_steps={self.warmup_steps}; "
                f"got total_steps={self.total_steps!r}."
            )
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise ConfigError(f"min_lr={self.min_lr!r} must be a finite number >= 0.")
        if not 0 <= self.d < 1:
            raise ConfigError(
                f"REX d={self.d!r} must be in [0, 1) (d = 1 divides by zero at z = 1); the paper uses 0.5."
            )

    @property
    def code(self) -> Profile:
        """The kernels' enum for this kind."""
        return Profile[self.kind.upper()]

    def lr(self, step: int, base_lr: float) -> float:
        """Learning rate of 0-based step index `step` for a group whose peak lr is `base_lr`."""
        return profile_lr(self.code, step, base_lr, self.warmup_steps, self.total_steps or 0, self.min_lr, self.d)

    def check_base(self, base_lr: float) -> None:
        """Refuse a peak lr below the floor (the profile would climb instead of decay)."""
        if self.kind != "constant" and base_lr < self.min_lr:
            raise ConfigError(f"lr={base_lr} is below min_lr={self.min_lr}; lower min_lr or raise lr.")


class REX(LRScheduler):
    """REX schedule for any optimizer: lr = min_lr + (base - min_lr)·(1-z)/(1-d·z), after linear warm-up.

    Call ``scheduler.step()`` after every ``optimizer.step()``: step index k runs at the profile's
    value at k, so the first step runs at base/warmup_steps (or at base without warm-up), never at 0.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 d: float = 0.5, last_epoch: int = -1) -> None:
        self.profile = LRProfile("rex", total_steps, warmup_steps, min_lr, d)
        for group in optimizer.param_groups:
            self.profile.check_base(float(group.get("initial_lr", group["lr"])))
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """Learning rate of every group at step index last_epoch."""
        return [self.profile.lr(self.last_epoch, base) for base in self.base_lrs]
