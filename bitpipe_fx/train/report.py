"""The pictures and numbers a training run leaves behind: loss curves, and a measured step next to the
simulator's prediction for the same plan.

The prediction replays the plan's program under the plan's own cost model (per-stage times from the
passes). Those times assume a FLOP rate, not this machine's, so the predicted timeline is scaled to the
measured step's total compute time before the two are drawn on one time axis; the bubble (idle share of
the step, the simulator's ``bubble_ratio``) does not depend on that scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bitpipe_fx.plan import Plan
from bitpipe_fx.sim.engine import simulate
from bitpipe_fx.sim.plot import gantt_compare
from bitpipe_fx.sim.trace import TraceEvent, write_chrome_trace

COMPUTE = ("F", "B", "I", "W")


def bubble(events: Sequence[TraceEvent], devices: int) -> tuple[float, float]:
    """(makespan, bubble ratio) of a timeline: mean over devices of 1 - compute time / makespan."""
    if not events:
        return 0.0, 0.0
    start = min(e.start for e in events)
    makespan = max(e.end for e in events) - start
    if makespan <= 0:
        return 0.0, 0.0
    busy = [0.0] * devices
    for e in events:
        if e.kind in COMPUTE and 0 <= e.device < devices:
            busy[e.device] += e.duration
    return makespan, sum(1 - b / makespan for b in busy) / devices


@dataclass(frozen=True)
class TimelineReport:
    """A measured step and its prediction, both in seconds."""

    step: int
    measured: tuple[TraceEvent, ...]
    predicted: tuple[TraceEvent, ...]
    measured_makespan: float
    measured_bubble: float
    predicted_makespan: float
    predicted_bubble: float

    def describe(self) -> str:
        return (f"timeline of step {self.step}: measured {self.measured_makespan * 1e3:.1f} ms, bubble "
                f"{100 * self.measured_bubble:.1f}%; simulator's prediction from the plan's cost model "
                f"(scaled to the measured compute) {self.predicted_makespan * 1e3:.1f} ms, bubble "
                f"{100 * self.predicted_bubble:.1f}%")


def compare_timelines(plan: Plan, measured: Sequence[TraceEvent], step: int) -> TimelineReport:
    """Simulate ``plan`` with its cost model and scale the prediction to the measured compute time of the
    first pipeline (ranks 0..D-1)."""
    devices = plan.program.devices
    report = simulate(plan.program, plan.cost_model())
    measured = [e for e in measured if e.device < devices]  # ranks >= D are further data-parallel pipelines
    t0 = min((e.start for e in measured), default=0.0)
    measured = tuple(replace(e, start=e.start - t0, end=e.end - t0) for e in measured)
    measured_busy = sum(e.duration for e in measured if e.kind in COMPUTE)
    predicted_busy = sum(report.busy_times)
    scale = measured_busy / predicted_busy if predicted_busy > 0 else 1.0
    predicted = tuple(replace(e, start=e.start * scale, end=e.end * scale) for e in report.events)
    m_span, m_bubble = bubble(measured, devices)
    return TimelineReport(step, measured, predicted, m_span, m_bubble, report.makespan * scale, report.bubble_ratio)


def write_timeline_files(out: Path, report: TimelineReport, meta: Mapping[str, object]) -> list[Path]:
    """timeline.json (measured, Chrome trace), timeline_predicted.json and timeline.png (both, one time axis)."""
    measured = write_chrome_trace(out / "timeline.json", report.measured, unit_us=1e6,
                                  metadata={**meta, "measured": True, "step": report.step,
                                            "bubble": report.measured_bubble})
    predicted = write_chrome_trace(out / "timeline_predicted.json", report.predicted, unit_us=1e6,
                                   metadata={**meta, "measured": False, "bubble": report.predicted_bubble})
    labels = (f"predicted by the simulator (plan's cost model, scaled to the measured compute): "
              f"{report.predicted_makespan * 1e3:.1f} ms, bubble {100 * report.predicted_bubble:.1f}%",
              f"measured, step {report.step}: {report.measured_makespan * 1e3:.1f} ms, "
              f"bubble {100 * report.measured_bubble:.1f}%")
    png = gantt_compare(report.predicted, report.measured, out / "timeline.png", labels=labels, units=("s", "s"))
    return [measured, predicted, png]


def plot_losses(path: Path, losses: Sequence[float], val: Sequence[tuple[int, float]], title: str) -> Path:
    """Training loss per step and validation loss at its steps, as a PNG."""
    from matplotlib.figure import Figure  # optional dependency (the plots extra), imported only to draw

    fig = Figure(figsize=(7.0, 3.6), dpi=100)
    ax = fig.subplots()
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, linewidth=0.9, color="#4c72b0", label="train (per step)")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", markersize=3.5, linewidth=1.2, color="#c44e52",
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(linewidth=0.3, alpha=0.6)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
