"""Measured timelines: record every action's start and end, merge ranks, write the simulator's trace format.

Times are seconds since the step's common start (ranks leave a barrier together, so their clocks line up
to within the barrier's skew). Compute events are named like the simulator's (``F0.3.5``); RECV events are
the time a device waited for a message; SYNC events run from the all-reduce's launch to its completion.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from bitpipe_fx.schedules.ir import Action
from bitpipe_fx.sim.trace import TraceEvent, write_chrome_trace


class Recorder:
    """Collects one device's events for one step; does nothing when disabled."""

    def __init__(self, device: int, enabled: bool, t0: float | None = None) -> None:
        self.device, self.enabled = device, enabled
        self.t0 = time.perf_counter() if t0 is None else t0
        self.events: list[TraceEvent] = []

    def action(self, a: Action, start: float, end: float) -> None:
        if self.enabled:  # str(a) costs more than the check
            self.event(str(a), a.kind, a.pipe, a.stage, a.microbatch, start, end)

    def event(self, name: str, kind: str, pipe: int, stage: int, microbatch: int, start: float, end: float) -> None:
        if self.enabled:
            self.events.append(
                TraceEvent(self.device, name, kind, pipe, stage, microbatch, start - self.t0, end - self.t0)
            )


def merge(per_device: Iterable[Sequence[TraceEvent]]) -> list[TraceEvent]:
    """One timeline from every device's events, ordered by start time then device."""
    return sorted((e for events in per_device for e in events), key=lambda e: (e.start, e.device, e.end))


def write_timeline(path: str | Path, events: Sequence[TraceEvent], metadata: dict | None = None) -> Path:
    """Chrome trace of a measured step (one unit = one second) in the simulator's format."""
    return write_chrome_trace(path, events, unit_us=1e6, metadata={"measured": True, **(metadata or {})})
