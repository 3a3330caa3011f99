"""Timeline events and their Chrome-trace JSON form (Perfetto, chrome://tracing).

Simulated and measured timelines share this format: one process per device, one "X" (complete) event per
action, with compute, point-to-point communication and all-reduce on separate thread rows. Times are floats
in any unit (cost-model units, or seconds for measured runs); ``unit_us`` says how many microseconds one
unit is, and is stored in the file so that reading it back restores the original unit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitpipe_fx.errors import ConfigError

# thread rows of a device, by event kind; any other kind gets a row of its own after these
THREADS: dict[str, tuple[int, str]] = {
    "F": (0, "compute"),
    "B": (0, "compute"),
    "I": (0, "compute"),
    "W": (0, "compute"),
    "SEND": (1, "p2p"),
    "RECV": (1, "p2p"),
    "SYNC": (2, "all-reduce"),
}


@dataclass(frozen=True)
class TraceEvent:
    """One interval on one device's timeline; pipe/stage/microbatch are -1 where they do not apply."""

    device: int
    name: str
    kind: str
    pipe: int
    stage: int
    microbatch: int
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def _thread(kind: str, extra: dict[str, tuple[int, str]]) -> tuple[int, str]:
    """Thread (tid, name) of an event kind; unknown kinds get new rows, numbered in order of appearance."""
    if kind in THREADS:
        return THREADS[kind]
    if kind not in extra:
        extra[kind] = (len({t for t, _ in THREADS.values()}) + len(extra), kind)
    return extra[kind]


def chrome_trace(
    events: Iterable[TraceEvent], *, unit_us: float = 1.0, metadata: Mapping[str, Any] | None = None
) -> dict:
    """Chrome-trace dict of ``events``; one time unit of the events is ``unit_us`` microseconds."""
    if not unit_us > 0:
        raise ConfigError(f"unit_us must be > 0 (microseconds per time unit), got {unit_us}")
    extra: dict[str, tuple[int, str]] = {}
    body: list[dict] = []
    threads: set[tuple[int, int, str]] = set()
    for ev in events:
        tid, tname = _thread(ev.kind, extra)
        threads.add((ev.device, tid, tname))
        body.append(
            {
                "name": ev.name,
                "cat": ev.kind,
                "ph": "X",
                "ts": ev.start * unit_us,
                "dur": (ev.end - ev.start) * unit_us,
                "pid": ev.device,
                "tid": tid,
                "args": {"kind": ev.kind, "pipe": ev.pipe, "stage": ev.stage, "microbatch": ev.microbatch},
            }
        )
    meta: list[dict] = []
    for device in sorted({d for d, _, _ in threads}):
        meta.append({"name": "process_name", "ph": "M", "pid": device, "tid": 0, "args": {"name": f"device {device}"}})
        meta.append({"name": "process_sort_index", "ph": "M", "pid": device, "tid": 0, "args": {"sort_index": device}})
    for device, tid, tname in sorted(threads):
        meta.append({"name": "thread_name", "ph": "M", "pid": device, "tid": tid, "args": {"name": tname}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": device, "tid": tid, "args": {"sort_index": tid}})
    return {
        "traceEvents": meta + body,
        "displayTimeUnit": "ms",
        "otherData": {**(metadata or {}), "unit_us": unit_us},
    }


def write_chrome_trace(
    path: str | Path, events: Iterable[TraceEvent], *, unit_us: float = 1.0, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``chrome_trace(events, ...)`` as JSON to ``path``; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(chrome_trace(events, unit_us=unit_us, metadata=metadata)))
    return path


def events_from_chrome_trace(trace: Mapping[str, Any]) -> list[TraceEvent]:
    """Inverse of ``chrome_trace``: the "X" events, in the unit recorded in ``otherData.unit_us``."""
    if "traceEvents" not in trace:
        raise ConfigError("not a Chrome trace: no 'traceEvents' key; expected the JSON object chrome_trace() writes")
    unit_us = float(trace.get("otherData", {}).get("unit_us", 1.0))
    out = []
    for ev in trace["traceEvents"]:
        if ev.get("ph") != "X":
            continue
        args = ev.get("args", {})
        start = float(ev["ts"]) / unit_us
        out.append(
            TraceEvent(
                device=int(ev["pid"]),
                name=str(ev["name"]),
                kind=str(args.get("kind", ev.get("cat", ""))),
                pipe=int(args.get("pipe", -1)),
                stage=int(args.get("stage", -1)),
                microbatch=int(args.get("microbatch", -1)),
                start=start,
                end=start + float(ev.get("dur", 0.0)) / unit_us,
            )
        )
    return out


def read_chrome_trace(path: str | Path) -> list[TraceEvent]:
    """Events of a Chrome-trace JSON file written by ``write_chrome_trace`` (or any X-event trace)."""
    try:
        return events_from_chrome_trace(json.loads(Path(path).read_text()))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); expected a Chrome trace") from exc
