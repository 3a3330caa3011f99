"""The pictures and numbers a training run leaves behind: loss curves, and a measured step next to the
simulator's prediction for the same plan.

The prediction replays the plan's program under the plan's own cost model (per-stage times from the
passes). Those times assume a FLOP rate, not this machine's, so the predicted timeline is scaled to the
measured step's total compute time before the two are drawn on one time axis; the bubble (idle share of
the step, the simulator's ``bubble_ratio``) does not depend on that scale. Both timelines are split per device
by one rule (``split``) into compute, waiting for communication and idle. Where the measured waiting is not a
schedule's bubble (``--local`` runs the devices one after another; more CPU ranks than cores also wait for a
core) the report says so instead of printing a bubble.
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


@dataclass(frozen=True)
class DeviceTime:
    """One device's step, the same three parts for a measured and a simulated timeline: compute (F, B, I, W),
    waiting for communication (receives, sends and all-reduces not overlapped by compute) and idle (the rest
    of the makespan). The simulator's idle (``SimReport.idle``) is communication + idle here."""

    compute: float
    communication: float
    idle: float


@dataclass(frozen=True)
class Setting:
    """How the measured step ran, which decides what its waiting time means."""

    local: bool = False  # one process ran every device, one after another (--local)
    processes: int = 1  # ranks on this machine
    cores: int = 1
    cpu: bool = True

    @property
    def shared(self) -> bool:
        """More CPU ranks than cores: a rank also waits for a core, which no schedule predicts."""
        return self.cpu and not self.local and self.processes > self.cores


def _merged(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _uncovered(intervals: Sequence[tuple[float, float]], cover: Sequence[tuple[float, float]]) -> float:
    """Length of the union of ``intervals`` outside the union of ``cover``."""
    total = 0.0
    cover = _merged(cover)
    for a, b in _merged(intervals):
        total += (b - a) - sum(max(0.0, min(b, d) - max(a, c)) for c, d in cover)
    return total


def split(events: Sequence[TraceEvent], devices: int) -> tuple[float, tuple[DeviceTime, ...]]:
    """(makespan, each device's compute / waiting for communication / idle) of a timeline."""
    if not events:
        return 0.0, tuple(DeviceTime(0.0, 0.0, 0.0) for _ in range(devices))
    makespan = max(e.end for e in events) - min(e.start for e in events)
    parts = []
    for d in range(devices):
        mine = [e for e in events if e.device == d]
        compute = [(e.start, e.end) for e in mine if e.kind in COMPUTE]
        busy = sum(b - a for a, b in compute)
        waiting = _uncovered([(e.start, e.end) for e in mine if e.kind not in COMPUTE], compute)
        parts.append(DeviceTime(busy, waiting, max(0.0, makespan - busy - waiting)))
    return makespan, tuple(parts)


def bubble(events: Sequence[TraceEvent], devices: int) -> tuple[float, float]:
    """(makespan, bubble ratio) of a timeline: mean over devices of 1 - compute time / makespan."""
    makespan, parts = split(events, devices)
    if makespan <= 0:
        return 0.0, 0.0
    return makespan, sum(1 - p.compute / makespan for p in parts) / devices


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


@dataclass(frozen=True)
class TimelineReport:
    """A measured step and its prediction, both in seconds, with each device's time split in three."""

    step: int
    measured: tuple[TraceEvent, ...]
    predicted: tuple[TraceEvent, ...]
    measured_makespan: float
    measured_bubble: float
    predicted_makespan: float
    predicted_bubble: float
    measured_split: tuple[DeviceTime, ...] = ()
    predicted_split: tuple[DeviceTime, ...] = ()

    def measured_figure(self, setting: Setting) -> str:
        """The measured step in one phrase, saying what its waiting means where a bubble would mislead."""
        span = _ms(self.measured_makespan)
        devices = len(self.measured_split)
        if setting.local:
            return (f"measured {span} in one process (--local) running the {devices} devices one after another, "
                    f"so a device's idle time is the others' work, not a pipeline bubble")
        if setting.shared:
            return (f"measured {span} with {setting.processes} processes sharing {setting.cores} CPU cores, so a "
                    f"rank also waits for a core: its waiting is not the schedule's bubble (that needs a core per "
                    f"process)")
        return f"measured {span}, bubble {100 * self.measured_bubble:.1f}%"

    def describe(self, setting: Setting = Setting()) -> str:
        lines = [f"timeline of step {self.step}: {self.measured_figure(setting)}; simulator's prediction from the "
                 f"plan's cost model (scaled to the measured compute) {_ms(self.predicted_makespan)}, bubble "
                 f"{100 * self.predicted_bubble:.1f}%"]
        for d, (m, p) in enumerate(zip(self.measured_split, self.predicted_split)):
            lines.append(f"  device {d}: compute {_ms(m.compute)}, waiting for communication {_ms(m.communication)}, "
                         f"idle {_ms(m.idle)}; predicted {_ms(p.compute)} / {_ms(p.communication)} / {_ms(p.idle)}")
        return "\n".join(lines)


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
    return TimelineReport(step, measured, predicted, m_span, m_bubble, report.makespan * scale, report.bubble_ratio,
                          split(measured, devices)[1], split(predicted, devices)[1])


def write_timeline_files(out: Path, report: TimelineReport, meta: Mapping[str, object],
                         setting: Setting = Setting()) -> list[Path]:
    """timeline.json (measured, Chrome trace), timeline_predicted.json and timeline.png (both, one time axis)."""
    measured = write_chrome_trace(out / "timeline.json", report.measured, unit_us=1e6,
                                  metadata={**meta, "measured": True, "step": report.step,
                                            "bubble": report.measured_bubble})
    predicted = write_chrome_trace(out / "timeline_predicted.json", report.predicted, unit_us=1e6,
                                   metadata={**meta, "measured": False, "bubble": report.predicted_bubble})
    labels = (f"predicted by the simulator (plan's cost model, scaled to the measured compute): "
              f"{_ms(report.predicted_makespan)}, bubble {100 * report.predicted_bubble:.1f}%",
              f"step {report.step}: {report.measured_figure(setting)}")
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
