"""Cost model of the simulator: compute time per stage and kind, communication and all-reduce α-β costs.

Costs are per stage (one chunk of the program's S stages), not per 1/D of the model: a schedule with
more, smaller stages must be given proportionally smaller costs (``CostModel.scaled`` does that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from bitpipe_fx.errors import ConfigError

PerStage = float | tuple[float, ...]


@dataclass(frozen=True)
class CostModel:
    """Times in one arbitrary unit, sizes in bytes, bandwidths in bytes per time unit."""

    forward: PerStage = 1.0  # time of F per stage (scalar = same for every stage)
    backward: PerStage = 2.0  # time of a full B per stage
    weight_fraction: float = 0.5  # W = backward*weight_fraction, I = backward - W
    activation_bytes: PerStage = 0.0  # bytes of one stage's output for one micro-batch (act and grad msgs)
    param_bytes: PerStage = 0.0  # bytes of one stage's parameters (gradient all-reduce size)
    p2p_latency: float = 0.0
    p2p_bandwidth: float = math.inf  # bytes per time unit
    allreduce_latency: float = 0.0  # alpha
    allreduce_bandwidth: float = math.inf  # beta
    data_parallel: int = 1
    recompute: PerStage = 0.0  # time a B or I of the stage first spends recomputing its forward (0 = stored)

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight_fraction <= 1.0:
            raise ConfigError(f"weight_fraction must lie in [0, 1], got {self.weight_fraction}")
        for name in ("p2p_latency", "allreduce_latency"):
            if not getattr(self, name) >= 0.0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("p2p_bandwidth", "allreduce_bandwidth"):
            if not getattr(self, name) > 0.0:
                raise ConfigError(
                    f"{name} must be > 0 bytes per time unit (math.inf = free), got {getattr(self, name)}"
                )
        if not isinstance(self.data_parallel, int) or self.data_parallel < 1:
            raise ConfigError(f"data_parallel must be a positive integer, got {self.data_parallel!r}")
        for name in ("forward", "backward", "activation_bytes", "param_bytes", "recompute"):
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else (value,)
            if not values or any(not v >= 0.0 for v in values):
                raise ConfigError(f"{name} must be a non-negative number or a non-empty tuple of them, got {value!r}")

    def per_stage(self, name: str, stages: int) -> tuple[float, ...]:
        """The per-stage field ``name`` as one value per stage; a scalar applies to every stage."""
        value = getattr(self, name)
        if not isinstance(value, tuple):
            return (float(value),) * stages
        if len(value) != stages:
            raise ConfigError(
                f"CostModel.{name} has {len(value)} entries but the program has {stages} stages; "
                f"give one value per stage or a single scalar"
            )
        return tuple(float(v) for v in value)

    def compute_time(self, kind: str, stage: int, stages: int) -> float:
        """Duration of one F, B, I or W of ``stage``; I = backward·(1-weight_fraction), W = the rest; a B or I
        of a recomputed stage adds its ``recompute`` time."""
        if kind == "F":
            return self.per_stage("forward", stages)[stage]
        backward = self.per_stage("backward", stages)[stage]
        again = self.per_stage("recompute", stages)[stage] if self.recompute else 0.0
        if kind == "B":
            return backward + again
        if kind == "W":
            return backward * self.weight_fraction
        if kind == "I":
            return backward * (1.0 - self.weight_fraction) + again
        raise ConfigError(f"no compute time for action kind {kind!r}; expected F, B, I or W")

    def p2p_time(self, nbytes: float) -> float:
        """Time from send to arrival of one message of ``nbytes``."""
        return self.p2p_latency + (nbytes / self.p2p_bandwidth if nbytes else 0.0)

    def allreduce_time(self, nbytes: float, group: int) -> float:
        """Ring all-reduce over ``group`` ranks: α + 2(n-1)/n · bytes/β, and 0 for a group of one."""
        if group <= 1:
            return 0.0
        transfer = 2.0 * (group - 1) / group * nbytes / self.allreduce_bandwidth if nbytes else 0.0
        return self.allreduce_latency + transfer

    def scaled(self, factor: float) -> CostModel:
        """The same model cut into stages ``factor`` times as large (e.g. D/S when a schedule has S stages).

        Compute times and parameter bytes scale with the stage; boundary activation sizes do not.
        """

        def mul(v: PerStage) -> PerStage:
            return tuple(x * factor for x in v) if isinstance(v, tuple) else v * factor

        return replace(self, forward=mul(self.forward), backward=mul(self.backward), param_bytes=mul(self.param_bytes),
                       recompute=mul(self.recompute))
