"""``schedule="auto"``: candidates (every family x its options x partition), ranked by the simulator, and the
choice under an optional memory limit.

One capture and one cost table serve every candidate; layouts are built once per family and partitions once
per placement. A candidate whose slowest device's compute alone already exceeds the best predicted step of a
fitting candidate is pruned without being generated. Peak memory per device, as counted here:
``STATE_COPIES`` x the parameter bytes the device holds (parameter, gradient and two optimizer-state
tensors, as Schedule-Free AdamW keeps) + the most stored activation bytes alive at once in the simulated
step (each stage's ``activation_bytes`` per micro-batch, held from its F to the B or W that frees it).
Everything is deterministic, so every rank picks the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from bitpipe_fx.errors import BitPipeError
from bitpipe_fx.passes.cost import CostTable
from bitpipe_fx.plan import Plan
from bitpipe_fx.planning import PartitionCache, base_plan, cut, with_costs
from bitpipe_fx.ranking import STATE_COPIES, Candidate, candidate_specs, rank
from bitpipe_fx.schedules.ir import Program
from bitpipe_fx.schedules.spec import ScheduleSpec, parse_bytes
from bitpipe_fx.sim.engine import SimReport, simulate

ORDER_OPTIONS = ("defer_w", "inflight")  # generator options that reorder actions but never change the placement


def peak_memory(plan: Plan, report: SimReport) -> tuple[float, ...]:
    """Predicted peak bytes per device: weights and optimizer state plus the most stored activations alive."""
    stored = [float(s.activation_bytes) for s in plan.stages]
    held = [0.0] * plan.devices
    peak = [0.0] * plan.devices
    for e in report.events:  # sorted by device, then start
        if e.kind == "F":
            held[e.device] += stored[e.stage]
            peak[e.device] = max(peak[e.device], held[e.device])
        elif e.kind in ("B", "W"):
            held[e.device] -= stored[e.stage]
    return tuple(STATE_COPIES * report.weight_bytes(d) + peak[d] for d in range(plan.devices))


def _bound(plan: Plan) -> float:
    """A lower bound on the step: the slowest device's compute alone."""
    return max(plan.device_loads(), default=0.0)


def autotune(
    costs: CostTable, devices: int, microbatches: int, fields: Mapping[str, object], *,
    memory_limit: float | str | None = None, balance_tolerance: float = 0.02,
    specs: Sequence[ScheduleSpec] | None = None,
) -> Plan:
    """The fastest candidate's plan (its ``search`` holds the ranking); ConfigError when none fits the limit."""
    limit = parse_bytes(memory_limit)
    layouts: dict[str, Program] = {}
    cache: PartitionCache = {}
    rows: list[tuple[Candidate, int, Plan | None]] = []
    best = float("inf")
    for index, spec in enumerate(specs or candidate_specs(devices, microbatches)):
        shape = replace(spec, options=tuple(o for o in spec.options if o[0] not in ORDER_OPTIONS))
        try:
            if shape not in layouts:
                layouts[shape] = base_plan(shape, devices, microbatches, fields).program
            base = replace(_skeleton(layouts[shape], fields), schedule=spec.name, schedule_options=spec.kwargs())
            part = cut(costs, base.program, balance_tolerance, cache)
        except BitPipeError:
            continue  # this family cannot run at this D and N, or has more stages than the graph has nodes
        bound_plan = replace(base, cuts=part.cuts, stages=costs.stages(part.cuts))
        if _bound(bound_plan) > best:
            rows.append((Candidate(str(spec), _bound(bound_plan), 0.0, (), "pruned"), index, None))
            continue
        plan = with_costs(base, costs, part)
        report = simulate(plan.program, plan.cost_model())
        peaks = peak_memory(plan, report)
        fits = limit is None or max(peaks) <= limit
        if fits:
            best = min(best, report.makespan)
        status = "ok" if fits else "over memory"
        rows.append((Candidate(str(spec), report.makespan, report.bubble_ratio, peaks, status), index, plan))
    return _choose(rows, limit)


def _skeleton(layout: Program, fields: Mapping[str, object]) -> Plan:
    """A plan around a family's layout program, not yet partitioned."""
    return Plan(schedule=layout.name, devices=layout.devices, microbatches=layout.microbatches, program=layout,
                cuts=(), stages=(), **fields)  # type: ignore[arg-type]


def _choose(rows: list[tuple[Candidate, int, Plan | None]], limit: float | None) -> Plan:
    """The winner's plan with the search record (``ranking.rank``)."""
    search, winner = rank([(c, index) for c, index, _ in rows], limit)
    return replace(rows[winner][2], search=search)  # type: ignore[arg-type]  # the winner was simulated
