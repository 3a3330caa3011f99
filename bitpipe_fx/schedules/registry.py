"""Name -> generator registry. A generator is a pure function (devices, microbatches, **options) -> Program."""

from __future__ import annotations

from collections.abc import Callable

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.ir import Program

Generator = Callable[..., Program]
SCHEDULES: dict[str, Generator] = {}


def register(name: str) -> Callable[[Generator], Generator]:
    """Decorator: make a generator available to ``generate(name, ...)``."""

    def deco(fn: Generator) -> Generator:
        if name in SCHEDULES:
            raise ScheduleError(f"schedule {name!r} is registered twice")
        SCHEDULES[name] = fn
        return fn

    return deco


def generate(name: str, devices: int, microbatches: int, **options) -> Program:
    """Build the program of schedule ``name`` for D devices and N micro-batches."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    if not isinstance(devices, int) or devices < 1:
        raise ScheduleError(f"devices must be a positive integer, got {devices!r}")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ScheduleError(f"microbatches must be a positive integer, got {microbatches!r}")
    return SCHEDULES[name](devices, microbatches, **options)
