"""Chimera (Li & Hoefler, SC'21): two pipes in opposite directions over the same devices, S = D.

The first N/2 micro-batches go down (stage k on device k), the rest up (stage k on device D-1-k). The order
is Chimera's 1F1B policy as a list schedule with unit costs (F = B): a free device runs a ready backward
before a ready forward, the deepest stage first. For N = D this is Chimera's basic unit (bubble
(D-2)/(2N+D-2) with F = B); for N > D basic units are concatenated with at most D micro-batches in flight
per pipe: the next one enters when the one D before it on that pipe has left stage 0. Forward doubling
and backward halving are not modelled.
"""

from __future__ import annotations

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.build import assemble
from bitpipe_fx.schedules.ir import Action, Program, chimera_placement
from bitpipe_fx.schedules.listsched import State, UnitCosts, list_schedule
from bitpipe_fx.schedules.registry import register


@register("chimera")
def chimera(devices: int, microbatches: int) -> Program:
    """Chimera's bidirectional order; D and N must be even."""
    if devices % 2:
        raise ScheduleError(
            f"chimera needs an even number of devices, got devices={devices}; use {max(2, devices - 1)} or "
            f"{devices + 1}"
        )
    if microbatches % 2:
        raise ScheduleError(
            f"chimera needs an even number of micro-batches (half per pipe), got microbatches={microbatches}; "
            f"use {' or '.join(str(n) for n in (microbatches - 1, microbatches + 1) if n > 0)}"
        )
    half = microbatches // 2
    pipe_of = [0] * half + [1] * half
    lag = devices

    def admit(a: Action, state: State) -> bool:
        if a.kind != "F" or a.stage != 0 or a.microbatch % half < lag:
            return True
        return state.finished(("B/I", a.pipe, 0, a.microbatch - lag))

    def priority(a: Action, ready: float) -> tuple:
        return (a.kind != "B", -a.stage, ready, a.microbatch)

    place = chimera_placement(devices)
    timed = list_schedule(place, pipe_of, priority, UnitCosts(1.0, 1.0), admit=admit)
    return assemble("chimera", place, pipe_of, [[t.action for t in dev] for dev in timed])
