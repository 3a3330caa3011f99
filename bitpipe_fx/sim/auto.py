"""``bitpipe-fx simulate --schedule auto``: the candidates ``schedule="auto"`` searches, simulated on the
command's costs and ranked by the same rule (``ranking.rank``), without a model.

Peak memory per device, as autotune counts it: ``STATE_COPIES`` x the parameter bytes the device holds plus the
most activation bytes alive at once in the simulated step (``--param-bytes`` and ``--activation-bytes`` give
the sizes; both 0 = no memory to rank by).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bitpipe_fx.ranking import STATE_COPIES, Candidate, Search, candidate_specs, rank
from bitpipe_fx.schedules.spec import AUTO, ScheduleSpec, parse_bytes
from bitpipe_fx.sim.report import SimReport


@dataclass(frozen=True)
class AutoChoice:
    """The ranking of the search and the winner's spec and report."""

    search: Search
    spec: ScheduleSpec
    report: SimReport


def peak_bytes(report: SimReport) -> tuple[float, ...]:
    """Predicted peak bytes per device: weights and optimizer state plus the most activations alive."""
    return tuple(STATE_COPIES * report.weight_bytes(d) + report.peak_activation_bytes(d) for d in range(report.devices))


def search(
    auto: ScheduleSpec, devices: int, microbatches: int, memory_limit: str | None,
    simulate_one: Callable[[ScheduleSpec], SimReport | None],
) -> AutoChoice:
    """Rank every candidate spec by its simulated step under the limit of ``auto`` (or ``memory_limit``);
    ``simulate_one`` returns a spec's report, or None when the family refuses this D and N."""
    given = auto.kwargs().get("memory_limit") if auto.name == AUTO else None
    limit = parse_bytes(given if given is not None else memory_limit)
    rows: list[tuple[Candidate, int]] = []
    reports: dict[int, tuple[ScheduleSpec, SimReport]] = {}
    for index, spec in enumerate(candidate_specs(devices, microbatches)):
        report = simulate_one(spec)
        if report is None:
            continue
        peaks = peak_bytes(report)
        status = "ok" if limit is None or max(peaks) <= limit else "over memory"
        rows.append((Candidate(str(spec), report.makespan, report.bubble_ratio, peaks, status), index))
        reports[len(rows) - 1] = (spec, report)
    ranking, winner = rank(rows, limit, unit="time units")
    spec, report = reports[winner]
    return AutoChoice(ranking, spec, report)
