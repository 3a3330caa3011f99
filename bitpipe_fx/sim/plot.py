"""Gantt charts of timelines (simulated or measured) as PNG files; matplotlib is imported only when drawing.

One row per device with its compute (colour per kind; pipe 1 lighter and hatched, micro-batch numbers in
the boxes that fit them) and a thin strip under it for the gradient all-reduces.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.sim.trace import TraceEvent

if TYPE_CHECKING:
    from bitpipe_fx.sim.report import SimReport

COLOURS = {"F": "#4c72b0", "B": "#55a868", "I": "#dd8452", "W": "#8172b3", "SYNC": "#c44e52"}
OTHER_COLOUR = "#999999"
LABELS = {"F": "F forward", "B": "B backward", "I": "I input grad", "W": "W weight grad", "SYNC": "all-reduce"}
ROW_HEIGHT = 0.36  # inches per device row
WIDTH = 14.0  # inches


def _events(source: SimReport | Iterable[TraceEvent]) -> list[TraceEvent]:
    return list(getattr(source, "events", source))


def _lighter(colour: str, amount: float = 0.45) -> tuple[float, float, float]:
    rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    return tuple(c + (1 - c) * amount for c in rgb)


def _draw(ax, events: Sequence[TraceEvent], title: str, unit: str, end: float | None) -> set[tuple[str, int]]:
    """Draw one timeline on ``ax`` up to time ``end`` (its own end if None); returns the (kind, pipe) pairs used."""
    devices = sorted({e.device for e in events})
    row = {d: i for i, d in enumerate(devices)}
    end = end or max((e.end for e in events), default=1.0) or 1.0
    shown = [e for e in events if e.kind not in ("SEND", "RECV") and e.duration > 0]
    band = {e: (row[e.device] - 0.4, 0.72) for e in shown if e.kind != "SYNC"}
    band.update(_strip_lanes([e for e in shown if e.kind == "SYNC"], row))
    groups: dict[tuple[str, int, float, float], list[tuple[float, float]]] = defaultdict(list)
    for e in shown:
        groups[(e.kind, max(e.pipe, 0), *band[e])].append((e.start, e.duration))
    for (kind, pipe, y, height), spans in groups.items():
        colour = COLOURS.get(kind, OTHER_COLOUR)
        ax.broken_barh(spans, (y, height), facecolors=_lighter(colour) if pipe else colour, edgecolor="black",
                       linewidth=0.3, hatch="//" if pipe else None)
    _label_boxes(ax, events, row, end)
    ax.set_xlim(0, end)
    ax.set_ylim(len(devices) - 0.45, -0.55)
    ax.set_yticks(range(len(devices)), [f"dev {d}" for d in devices])
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    return {(kind, pipe) for kind, pipe, _, _ in groups}


def _strip_lanes(events: Sequence[TraceEvent], row: dict[int, int]) -> dict[TraceEvent, tuple[float, float]]:
    """(y, height) of each all-reduce in the thin strip under its device row; overlapping ones get own lanes."""
    out = {}
    for d in {e.device for e in events}:
        lanes: list[float] = []  # end time of the last interval in each lane
        lane_of = {}
        for e in sorted((e for e in events if e.device == d), key=lambda e: (e.start, e.end)):
            k = next((i for i, busy_until in enumerate(lanes) if busy_until <= e.start), len(lanes))
            lanes[k:k + 1] = [e.end]
            lane_of[e] = k
        height = 0.16 / len(lanes)
        out.update({e: (row[d] + 0.34 + k * height, height) for e, k in lane_of.items()})
    return out


def _label_boxes(ax, events: Sequence[TraceEvent], row: dict[int, int], end: float) -> None:
    """Micro-batch number inside each compute box wide enough to hold it."""
    fig = ax.figure
    width_px = ax.get_position().width * fig.get_figwidth() * fig.dpi
    px_per_unit = width_px / end
    for e in events:
        if e.microbatch < 0 or e.kind not in ("F", "B", "I", "W"):
            continue
        text = str(e.microbatch)
        if e.duration * px_per_unit >= 6.5 * len(text) + 2:
            ax.text(e.start + e.duration / 2, row[e.device], text, ha="center", va="center", fontsize=6,
                    color="white" if e.pipe <= 0 else "black")


def _legend(fig, used: set[tuple[str, int]]) -> None:
    from matplotlib.patches import Patch

    handles = []
    for kind, pipe in sorted(used, key=lambda kp: (list(COLOURS).index(kp[0]) if kp[0] in COLOURS else 99, kp)):
        colour = COLOURS.get(kind, OTHER_COLOUR)
        label = LABELS.get(kind, kind) + (f" (pipe {pipe})" if any(p for _, p in used) else "")
        handles.append(Patch(facecolor=_lighter(colour) if pipe else colour, edgecolor="black", linewidth=0.3,
                             hatch="//" if pipe else None, label=label))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)


def gantt_panels(panels: Sequence[tuple[str, SimReport | Iterable[TraceEvent]]], path: str | Path, *,
                 unit: str = "units") -> Path:
    """Stacked Gantt charts on one shared time axis, one panel per (title, timeline), written as a PNG."""
    return _figure([(title, _events(src), unit) for title, src in panels], Path(path), share_x=True)


def gantt(source: SimReport | Iterable[TraceEvent], path: str | Path, title: str | None = None, *,
          unit: str = "units") -> Path:
    """Gantt chart PNG of one timeline (a SimReport or its events)."""
    if title is None:
        name = getattr(source, "name", "timeline")
        makespan = getattr(source, "makespan", None)
        title = name if makespan is None else f"{name}: makespan {makespan:g}"
    return gantt_panels([(title, source)], path, unit=unit)


def gantt_compare(a_events: SimReport | Iterable[TraceEvent], b_events: SimReport | Iterable[TraceEvent],
                  path: str | Path, labels: Sequence[str] = ("predicted", "measured"), *,
                  units: Sequence[str] = ("units", "s")) -> Path:
    """Two timelines stacked (e.g. predicted vs measured); one shared time axis only when the units agree."""
    if len(labels) != 2 or len(units) != 2:
        raise ConfigError(f"gantt_compare needs two labels and two units, got {list(labels)} and {list(units)}")
    panels = [(labels[0], _events(a_events), units[0]), (labels[1], _events(b_events), units[1])]
    return _figure(panels, Path(path), share_x=units[0] == units[1])


def _figure(panels: Sequence[tuple[str, list[TraceEvent], str]], path: Path, share_x: bool) -> Path:
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    if not panels:
        raise ConfigError("gantt needs at least one timeline to draw")
    heights = [max(len({e.device for e in evs}), 1) * ROW_HEIGHT + 0.9 for _, evs, _ in panels]
    total = sum(heights) + 0.5
    fig = Figure(figsize=(WIDTH, total), dpi=110)
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=share_x, gridspec_kw={"height_ratios": heights})[:, 0]
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.3 / total, bottom=0.85 / total, hspace=0.9 / max(heights))
    used: set[tuple[str, int]] = set()
    end = max((e.end for _, evs, _ in panels for e in evs), default=1.0) or 1.0
    for ax, (title, evs, unit) in zip(axes, panels):
        used |= _draw(ax, evs, title, unit, end if share_x else None)
        ax.tick_params(labelbottom=True)
    _legend(fig, used)
    with rc_context({"hatch.linewidth": 0.4}):
        fig.savefig(path)
    return path
