"""Chimera (Li & Hoefler, SC'21): two pipes in opposite directions over the same devices, S = D.

The first N/2 micro-batches go down (stage k on device k), the rest up (stage k on device D-1-k). The order
is a 1F1B-style list schedule under the given costs; each pipe keeps at most D/2 or D micro-batches in
flight (the next enters when the one D/2 or D before it on that pipe has left stage 0: Chimera's
concatenation of basic units when N > D). The generator tries backward-first and earliest-ready-first
policies, each breaking ties by deepest stage or oldest micro-batch, at both window sizes, and keeps the
fastest (under ``costs=``, the plan's CostModel: its per-stage times order the actions and the simulator,
with message and all-reduce costs, picks the candidate). With F = B this gives Chimera's bubble
(D-2)/(2N+D-2); forward doubling is not modelled.
"""

from __future__ import annotations

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.build import require_even_devices
from bitpipe_fx.schedules.costed import fastest, unit_variants
from bitpipe_fx.schedules.ir import Action, Program, chimera_placement
from bitpipe_fx.schedules.listsched import Admit, State, list_schedule
from bitpipe_fx.schedules.registry import register
from bitpipe_fx.sim.cost import CostModel

POLICIES = (
    lambda a, ready: (a.kind != "B", -a.stage, ready, a.microbatch),  # backward first, deepest stage
    lambda a, ready: (a.kind != "B", ready, a.microbatch),  # backward first, oldest
    lambda a, ready: (ready, a.kind != "B", -a.stage, a.microbatch),  # earliest ready, deepest stage
    lambda a, ready: (ready, a.kind != "B", a.microbatch),  # earliest ready, oldest
)


def _window(half: int, lag: int) -> Admit:
    """The k-th micro-batch of a pipe enters once the (k - lag)-th of that pipe has left stage 0."""

    def admit(a: Action, state: State) -> bool:
        if a.kind != "F" or a.stage != 0 or a.microbatch % half < lag:
            return True
        return state.finished(("B/I", a.pipe, 0, a.microbatch - lag))

    return admit


@register("chimera")
def chimera(
    devices: int, microbatches: int, forward: float = 1.0, backward: float = 2.0, costs: CostModel | None = None
) -> Program:
    """Chimera's bidirectional order for even D and N, tuned for the costs of one F and one B (or ``costs``)."""
    require_even_devices("chimera", devices)
    if microbatches % 2:
        raise ScheduleError(
            f"chimera needs an even number of micro-batches (half per pipe), got microbatches={microbatches}; "
            f"use {' or '.join(str(n) for n in (microbatches - 1, microbatches + 1) if n > 0)}"
        )
    half = microbatches // 2
    pipe_of = [0] * half + [1] * half
    place = chimera_placement(devices)
    units = unit_variants(costs, forward, backward)
    candidates = [
        list_schedule(place, pipe_of, policy, unit, admit=_window(half, lag))
        for unit in units
        for lag in (devices // 2, devices)
        for policy in POLICIES
    ]
    return fastest("chimera", place, pipe_of, candidates, costs, units[0])
