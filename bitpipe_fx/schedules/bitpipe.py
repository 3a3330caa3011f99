"""bitpipe_fx's own BitPipe: the published placement, pipe map and eager sync, with split backward.

Every backward is split into I (input gradient, on the critical path) and W (weight gradient, needed only
by the optimizer). A list schedule with the given costs runs I and F deepest stage first
and and defers W into the gaps where a device would otherwise wait; a device that holds
``inflight * D`` deferred W's runs the oldest one first, which bounds the activations kept alive, and
micro-batch m enters once micro-batch m - inflight * D has left stage 0. The
generator also times the published order (each B as I then W) under the same costs and returns whichever
is faster (on a tie the published order, which keeps fewer activations), so its makespan is never worse
than ``bitpipe-paper``'s under those costs. By default it also tries two units of D micro-batches in
flight, which keeps the idle time flat in N when B = 3F at the price of more activation memory. Given the
plan's CostModel (``costs=``) it orders with its per-stage times and picks the candidate the simulator finds
fastest with its message and all-reduce costs.
"""

from __future__ import annotations

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.bitpipe_paper import bitpipe_pipe_of, check_bitpipe, paper_order
from bitpipe_fx.schedules.costed import fastest, unit_variants
from bitpipe_fx.schedules.ir import Action, Program, bitpipe_placement
from bitpipe_fx.schedules.listsched import Admit, State, list_schedule
from bitpipe_fx.schedules.registry import register
from bitpipe_fx.sim.cost import CostModel


def after_slot_frees(lag: int) -> Admit:
    """Micro-batch m may enter stage 0 once micro-batch m - lag has finished its input gradient there."""

    def admit(a: Action, state: State) -> bool:
        if a.kind != "F" or a.stage != 0 or a.microbatch < lag:
            return True
        return state.finished(("B/I", a.pipe, 0, a.microbatch - lag))

    return admit


def _deferred_w(a: Action, ready: float) -> tuple:
    """F and I deepest stage first; W only when nothing else is ready."""
    return (a.kind == "W", -a.stage, ready, a.microbatch)


def _tuple(value: float | tuple[float, ...] | list[float]) -> float | tuple[float, ...]:
    """Per-stage costs may come as a list (e.g. from JSON); keep them hashable."""
    return tuple(value) if isinstance(value, list) else value


def _split(a: Action) -> tuple[Action, ...]:
    """A full backward as I then W; anything else unchanged."""
    if a.kind != "B":
        return (a,)
    return (Action("I", a.pipe, a.stage, a.microbatch), Action("W", a.pipe, a.stage, a.microbatch))


@register("bitpipe")
def bitpipe(
    devices: int,
    microbatches: int,
    forward: float | tuple[float, ...] = 1.0,
    backward: float | tuple[float, ...] = 2.0,
    weight_fraction: float = 0.5,
    inflight: int | None = None,
    defer_w: bool | None = None,
    costs: CostModel | None = None,
) -> Program:
    """BitPipe with I/W split and deferred W, tuned for the costs of one F and one B (scalars, or one value
    per stage, as in the simulator's CostModel).

    ``inflight`` is the number of D-micro-batch units in flight (1 = the paper's activation budget); None
    tries 1 and 2 and keeps the faster (the smaller on a tie). ``defer_w``: True = only the deferred-W list
    orders, False = only the published order (each B as I then W), None = both. ``costs`` replaces
    ``forward``, ``backward`` and ``weight_fraction`` with the plan's cost model.
    """
    check_bitpipe("bitpipe", devices, microbatches)
    if inflight is not None and (not isinstance(inflight, int) or inflight < 1):
        raise ScheduleError(
            f"bitpipe inflight must be a positive integer (units of D micro-batches) or None, got {inflight!r}"
        )
    units = unit_variants(costs, _tuple(forward), _tuple(backward), weight_fraction)
    place = bitpipe_placement(devices)
    pipe_of = bitpipe_pipe_of(devices, microbatches)
    candidates = []
    if defer_w is not True:
        published = paper_order(devices, microbatches)
        candidates.append([[x for a in acts for x in _split(a)] for acts in published])
    windows = (1, 2) if inflight is None else (inflight,)
    for unit in units:
        for window in () if defer_w is False else windows:
            candidates.append(list_schedule(
                place,
                pipe_of,
                _deferred_w,
                unit,
                split=True,
                admit=after_slot_frees(window * devices),
                max_deferred_w=window * devices,
            ))
    return fastest("bitpipe", place, pipe_of, candidates, costs, units[0])
