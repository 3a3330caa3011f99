"""``schedule="auto"``: candidates (every family x its options x partition), ranked by the simulator, and the
choice under an optional memory limit.

One capture and one cost table serve every candidate; layouts are built once per family and partitions once
per placement. A candidate whose slowest device's compute alone already exceeds the best predicted step of a
fitting candidate is pruned without being generated. Peak memory per device is the memory model's
(sim/memory.py) under the candidate's recomputation.
Everything is deterministic, so every rank picks the same plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from bitpipe_fx.errors import BitPipeError
from bitpipe_fx.passes.cost import CostTable
from bitpipe_fx.plan import Plan
from bitpipe_fx.planning import PartitionCache, base_plan, cut, with_costs
from bitpipe_fx.ranking import Candidate, candidate_specs, rank
from bitpipe_fx.recompute import check_mode, stage_flags
from bitpipe_fx.schedules.ir import Program
from bitpipe_fx.schedules.spec import ScheduleSpec, parse_bytes
from bitpipe_fx.sim.engine import simulate

ORDER_OPTIONS = ("defer_w", "inflight")  # generator options that reorder actions but never change the placement


def peak_memory(plan: Plan) -> tuple[float, ...]:
    """Predicted peak bytes per device under the plan's recomputation (the memory model, sim/memory.py)."""
    return tuple(m.total for m in plan.memory())


def _recomputed(plan: Plan, mode: str, limit: float | None) -> Plan:
    """``plan`` with ``mode``'s recomputation; when "auto" cannot fit, every stage recomputed (over memory)."""
    flags = stage_flags(plan, mode, limit)
    return replace(plan, recompute=(True,) * plan.num_stages if flags is None else flags if any(flags) else ())


def _bound(plan: Plan) -> float:
    """A lower bound on the step: the slowest device's compute alone."""
    return max(plan.device_loads(), default=0.0)


def autotune(
    costs: CostTable, devices: int, microbatches: int, fields: Mapping[str, object], *,
    memory_limit: float | str | None = None, balance_tolerance: float = 0.02,
    specs: Sequence[ScheduleSpec] | None = None, recompute: str = "none",
) -> Plan:
    """The fastest candidate's plan (its ``search`` holds the ranking); ConfigError when none fits the limit.
    ``recompute``: "none", "full", or "auto" (each candidate's least recomputation that fits)."""
    limit = parse_bytes(memory_limit)
    check_mode(recompute)
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
        plan = _recomputed(with_costs(base, costs, part), recompute, limit)
        report = simulate(plan.program, plan.cost_model())
        peaks = peak_memory(plan)
        fits = limit is None or max(peaks) <= limit
        if fits:
            best = min(best, report.makespan)
        status = "ok" if fits else "over memory"
        again = tuple(s for s, f in enumerate(plan.recompute) if f)
        rows.append((Candidate(str(spec), report.makespan, report.bubble_ratio, peaks, status, again), index, plan))
    return _choose(rows, limit)


def _skeleton(layout: Program, fields: Mapping[str, object]) -> Plan:
    """A plan around a family's layout program, not yet partitioned."""
    return Plan(schedule=layout.name, devices=layout.devices, microbatches=layout.microbatches, program=layout,
                cuts=(), stages=(), **fields)  # type: ignore[arg-type]


def _choose(rows: list[tuple[Candidate, int, Plan | None]], limit: float | None) -> Plan:
    """The winner's plan with the search record (``ranking.rank``)."""
    search, winner = rank([(c, index) for c, index, _ in rows], limit)
    return replace(rows[winner][2], search=search)  # type: ignore[arg-type]  # the winner was simulated
