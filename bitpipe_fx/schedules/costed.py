"""Cost-aware generation: the list scheduler's timing from a CostModel, and the fastest candidate under it.

A generator with freedom builds a few candidate orders and keeps the fastest. Given the plan's CostModel
(per-stage F, I, W, activation bytes, link and all-reduce costs) it times each candidate with the
simulator, so messages and the replica all-reduce count; without one it replays them with unit costs.
"""

from __future__ import annotations

from collections.abc import Sequence

from bitpipe_fx.schedules.build import assemble
from bitpipe_fx.schedules.ir import Action, Placement, Program
from bitpipe_fx.schedules.listsched import ListSchedule, UnitCosts, makespan
from bitpipe_fx.sim import engine  # a module import: bitpipe_fx.sim imports the schedule layer too
from bitpipe_fx.sim.cost import CostModel, PerStage

Orders = Sequence[Sequence[Action]]
_FLOOR = 1e-9  # the list scheduler needs positive times: a free stage costs this share of the largest


def _positive(value: PerStage, largest: float) -> float | tuple[float, ...]:
    floor = _FLOOR * largest if largest > 0 else 1.0
    if isinstance(value, tuple):
        return tuple(max(float(v), floor) for v in value)
    return max(float(value), floor)


def unit_costs(
    costs: CostModel | None,
    forward: PerStage = 1.0,
    backward: PerStage = 2.0,
    weight_fraction: float = 0.5,
) -> UnitCosts:
    """The list scheduler's costs: those of ``costs`` when given, else the generator's own options."""
    if costs is None:
        return UnitCosts(forward, backward, weight_fraction)
    times = [*_values(costs.forward), *_values(costs.backward)]
    largest = max(times, default=0.0)
    share = min(max(costs.weight_fraction, 0.01), 0.99)
    return UnitCosts(_positive(costs.forward, largest), _positive(costs.backward, largest), share)


def unit_variants(
    costs: CostModel | None,
    forward: PerStage = 1.0,
    backward: PerStage = 2.0,
    weight_fraction: float = 0.5,
) -> tuple[UnitCosts, ...]:
    """The timings to list-schedule with: the cost model's, then the generator's own (when they differ), so
    the candidates under ``costs`` include every unit-cost candidate and the choice is never worse."""
    own = UnitCosts(forward, backward, weight_fraction)
    return tuple(dict.fromkeys((unit_costs(costs, forward, backward, weight_fraction), own)))


def _values(value: PerStage) -> tuple[float, ...]:
    return value if isinstance(value, tuple) else (value,)


def fastest(
    name: str,
    placement: Placement,
    pipe_of: Sequence[int],
    candidates: Sequence[Orders | ListSchedule],
    costs: CostModel | None,
    unit: UnitCosts,
) -> Program:
    """The first of the fastest candidates as a Program: simulated under ``costs``, else replayed with ``unit``
    (a list schedule made with ``unit`` brings its replayed makespan along)."""
    orders = [c.actions() if isinstance(c, ListSchedule) else c for c in candidates]
    if len(orders) == 1:
        return assemble(name, placement, pipe_of, orders[0])
    if costs is None:
        times = [c.replayed if isinstance(c, ListSchedule) and c.costs == unit else
                 makespan(placement, o, unit, pipe_of) for c, o in zip(candidates, orders)]
        return assemble(name, placement, pipe_of, orders[times.index(min(times))])
    programs = [assemble(name, placement, pipe_of, o) for o in orders]
    times = [engine.simulate(program, costs).makespan for program in programs]
    return programs[times.index(min(times))]
