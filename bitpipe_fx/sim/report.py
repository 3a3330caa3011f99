"""The simulator's report of one step: per-device times, bubble, memory, traffic and the trace events."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter

from bitpipe_fx.schedules.comm import Handoff, message_of
from bitpipe_fx.schedules.ir import Action
from bitpipe_fx.sim.trace import TraceEvent

Span = tuple[int, float, float, Action | Handoff]  # (device, start, end, the action or the sent value)


@dataclass(frozen=True)
class SimReport:
    """What one simulated step looks like; per-device values are tuples indexed by device.

    Activations: one unit is one (stage, micro-batch) forward whose stored activations are still held;
    it is counted from its F until the backward that frees it: B, or W when the backward is split
    (I leaves what W needs). ``peak_activation_bytes`` weighs each unit with that stage's
    ``activation_bytes`` (its output size per micro-batch), a proxy for the stored tensors.
    """

    name: str
    devices: int
    stages: int
    microbatches: int
    makespan: float
    busy_times: tuple[float, ...]
    compute_end: tuple[float, ...]  # end of each device's last compute
    step_end: tuple[float, ...]  # compute_end, or later when an all-reduce finishes after it
    peak_activation_units: tuple[int, ...]
    peak_activation_byte_counts: tuple[float, ...]
    weight_chunks: tuple[int, ...]
    weight_byte_counts: tuple[float, ...]
    messages_cross: int  # cross-device messages (each one SEND/RECV pair)
    local_handoffs: int  # producer -> consumer pairs on one device (no message)
    bytes_moved: float  # bytes of all cross-device messages
    spans: tuple[Span, ...]  # every compute, send and all-reduce, in simulation order (``events`` reads them)

    @cached_property
    def events(self) -> tuple[TraceEvent, ...]:
        """The spans as trace events sorted by (device, start, end), built on first use (they are many)."""
        return tuple(_event(span) for span in sorted(self.spans, key=itemgetter(0, 1, 2)))

    def busy(self, device: int) -> float:
        """Compute time of ``device`` (F, B, I, W)."""
        return self.busy_times[device]

    def idle(self, device: int) -> float:
        """makespan - busy(device): waiting, including exposed all-reduce and the tail after its step ends."""
        return self.makespan - self.busy_times[device]

    def peak_activations(self, device: int) -> int:
        """Most (stage, micro-batch) activation sets held at once on ``device``."""
        return self.peak_activation_units[device]

    def peak_activation_bytes(self, device: int) -> float:
        return self.peak_activation_byte_counts[device]

    def weight_copies(self, device: int) -> int:
        """Number of (pipe, stage) chunks ``device`` holds."""
        return self.weight_chunks[device]

    def weight_bytes(self, device: int) -> float:
        return self.weight_byte_counts[device]

    def exposed_allreduce_on(self, device: int) -> float:
        """All-reduce time of ``device`` left after its last compute."""
        return self.step_end[device] - self.compute_end[device]

    @property
    def exposed_allreduce(self) -> float:
        """Max over devices of the all-reduce time left after the device's last compute."""
        return max(self.exposed_allreduce_on(d) for d in range(self.devices))

    @property
    def bubble_ratio(self) -> float:
        """Mean over devices of idle/makespan (the published 1F1B convention: (D-1)/(N+D-1))."""
        if self.makespan == 0:
            return 0.0
        return sum(self.idle(d) for d in range(self.devices)) / (self.devices * self.makespan)

    @property
    def bubble_over_ideal(self) -> float:
        """Total idle over total busy time: the bubble relative to the ideal (bubble-free) step."""
        busy = sum(self.busy_times)
        return sum(self.idle(d) for d in range(self.devices)) / busy if busy else 0.0

    def summary_row(self) -> dict:
        """One flat row for comparison tables (maxima over devices where per-device)."""
        return {
            "schedule": self.name,
            "devices": self.devices,
            "stages": self.stages,
            "microbatches": self.microbatches,
            "makespan": self.makespan,
            "bubble_ratio": self.bubble_ratio,
            "bubble_over_ideal": self.bubble_over_ideal,
            "peak_activations": max(self.peak_activation_units),
            "peak_activation_bytes": max(self.peak_activation_byte_counts),
            "weight_copies": max(self.weight_chunks),
            "weight_bytes": max(self.weight_byte_counts),
            "messages_cross": self.messages_cross,
            "local_handoffs": self.local_handoffs,
            "bytes_moved": self.bytes_moved,
            "exposed_allreduce": self.exposed_allreduce,
        }


def _event(span: Span) -> TraceEvent:
    device, start, end, what = span
    if isinstance(what, Action):
        return TraceEvent(device, str(what), what.kind, what.pipe, what.stage, what.microbatch, start, end)
    msg = message_of(what)
    return TraceEvent(device, str(msg), "SEND", msg.pipe, msg.stage, msg.microbatch, start, end)
