"""One candidate plan from one captured cost table: partition for the schedule's placement, then a program
generated with the plan's own cost model.

Partition and schedule are decided together: the schedule's placement and pipe map (which never depend on
costs) fix what the partitioner balances; the partition's stage costs become the CostModel the generator
orders with; where there is a choice of partitions, the one whose program simulates fastest wins. Every step
is deterministic, so every rank derives the same plan, and ``costed_program`` regenerates a saved plan's
program from what the plan records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.passes import partition
from bitpipe_fx.passes.cost import CostTable
from bitpipe_fx.passes.partition import Partition
from bitpipe_fx.plan import NETWORK_FIELDS, Plan
from bitpipe_fx.schedules import generate
from bitpipe_fx.schedules.ir import Program
from bitpipe_fx.schedules.registry import takes_costs
from bitpipe_fx.schedules.spec import ScheduleSpec
from bitpipe_fx.sim.cost import CostModel
from bitpipe_fx.sim.engine import SimReport, simulate

PartitionCache = dict[tuple[object, tuple[int, ...], float], Partition]


def check_network(network: Mapping[str, float] | None) -> dict[str, float]:
    """The link costs as CostModel fields (seconds, bytes/s), refusing unknown names and invalid values."""
    links = dict(network or {})
    unknown = sorted(set(links) - set(NETWORK_FIELDS))
    if unknown:
        raise ConfigError(f"network has no field {unknown[0]!r}; its fields are {', '.join(NETWORK_FIELDS)}")
    CostModel(**{k: float(v) for k, v in links.items()})  # refuses negative latency or non-positive bandwidth
    return {k: float(links[k]) for k in NETWORK_FIELDS if k in links}


def base_plan(spec: ScheduleSpec, devices: int, microbatches: int, fields: Mapping[str, object]) -> Plan:
    """A plan of ``spec`` with its layout program and no partition yet (``fields``: the model's Plan fields)."""
    return Plan(schedule=spec.name, devices=devices, microbatches=microbatches,
                program=layout(spec, devices, microbatches), cuts=(), stages=(),
                schedule_options=spec.kwargs(), **fields)  # type: ignore[arg-type]


def layout(spec: ScheduleSpec, devices: int, microbatches: int) -> Program:
    """The schedule's program under unit costs: its placement and pipe map, which costs never change."""
    return generate(spec.name, devices, microbatches, **spec.kwargs())


def costed_program(plan: Plan) -> Program:
    """The program of ``plan``'s schedule generated with the plan's cost model (the layout if it takes none)."""
    costs = plan.cost_model() if plan.costed else None
    return generate(plan.schedule, plan.devices, plan.microbatches, costs, **plan.schedule_options)


def cut(
    costs: CostTable, program: Program, tolerance: float, cache: PartitionCache | None = None,
    weights: Sequence[float] | None = None,
) -> Partition:
    """The partition balancing ``program``'s placement (memoised per placement, pipe split and tolerance)."""
    per_pipe = tuple(program.pipe_of.count(p) for p in range(program.pipes))
    key = (program.placement, per_pipe, tolerance)
    if weights is not None or cache is None or key not in cache:
        part = partition(costs, program.placement, pipe_microbatches=per_pipe, weights=weights,
                         balance_tolerance=tolerance)
        if weights is not None or cache is None:
            return part
        cache[key] = part
    return cache[key]


def with_costs(base: Plan, costs: CostTable, part: Partition) -> Plan:
    """``base`` cut at ``part`` with its program regenerated from the resulting cost model."""
    plan = replace(base, cuts=part.cuts, stages=costs.stages(part.cuts), costed=takes_costs(base.schedule))
    return replace(plan, program=costed_program(plan)) if plan.costed else plan


def best_partition(
    base: Plan, costs: CostTable, tolerances: Sequence[float], cache: PartitionCache | None = None,
) -> tuple[Plan, SimReport]:
    """Of the partitions at ``tolerances`` (first = preferred on a tie), the plan whose program is fastest."""
    if not tolerances:
        raise ConfigError("best_partition needs at least one balance tolerance, got none")
    best: tuple[Plan, SimReport] | None = None
    for tolerance in dict.fromkeys(tolerances):
        plan = with_costs(base, costs, cut(costs, base.program, tolerance, cache))
        report = simulate(plan.program, plan.cost_model())
        if best is None or report.makespan < best[1].makespan:
            best = (plan, report)
    return best  # type: ignore[return-value]  # tolerances is not empty
