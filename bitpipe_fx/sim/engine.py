"""Event-driven replay of a Program under a CostModel.

Semantics (the runtime's, idealised):
- each device runs its lowered op list (``comm.lower``) in order, one compute at a time;
- a SEND costs the sender nothing and the message arrives ``p2p_latency + bytes/p2p_bandwidth`` later;
  a RECV blocks its device until the message has arrived; links have no contention;
- a local hand-off (producer and consumer chunk on one device) is free and needs only program order;
- SYNC costs the device nothing; the all-reduce of a stage's gradients starts once every replica of the
  stage has issued its SYNC and takes ``α + 2(n-1)/n · param_bytes/β`` over n = replica devices × data_parallel;
- a device's step ends when its last compute is done and all its all-reduces are done.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.comm import Comm, Message, lower, produced_message, produced_value
from bitpipe_fx.schedules.deps import describe, needs, provides
from bitpipe_fx.schedules.ir import COMPUTE_KINDS, Action, Program
from bitpipe_fx.sim.cost import CostModel
from bitpipe_fx.sim.trace import TraceEvent

Key = tuple | Message  # a result of the dependency rule (deps.Key), or a Message (arrival of a cross-device send)


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
    events: tuple[TraceEvent, ...]

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


def _local_needs(program: Program, device: int, action: Action) -> list[Key]:
    """The needs of ``action`` produced on its own device (cross-device ones are the RECV before it)."""
    place = program.placement
    return [k for k in needs(action, program.stages) if place.device(k[1], k[2]) == device]


def _message_bytes(msg: Message, act_bytes: tuple[float, ...]) -> float:
    """An activation of stage s has stage s's output size; a gradient from stage s, stage s-1's output size."""
    return act_bytes[msg.stage] if msg.kind == "act" else act_bytes[msg.stage - 1]


def _describe(key: Key) -> str:
    return f"message {key}" if isinstance(key, Message) else describe(key)


def simulate(program: Program, cost: CostModel | None = None) -> SimReport:
    """Replay ``program`` under ``cost``; raises ScheduleError when it deadlocks or is inconsistent."""
    cost = cost or CostModel()
    D, S = program.devices, program.stages
    place = program.placement
    act_bytes = cost.per_stage("activation_bytes", S)
    param_bytes = cost.per_stage("param_bytes", S)
    durations = {k: tuple(cost.compute_time(k, s, S) for s in range(S)) for k in COMPUTE_KINDS}
    for d, acts in enumerate(program.device_actions):
        for a in acts:
            if not (0 <= a.pipe < program.pipes and 0 <= a.stage < S):
                raise ScheduleError(f"{a} on device {d} names chunk ({a.pipe}, {a.stage}), which the placement "
                                    f"lacks ({program.pipes} pipes x {S} stages)")
            if (owner := place.device(a.pipe, a.stage)) != d:
                raise ScheduleError(f"{a} is on device {d} but the placement puts ({a.pipe}, {a.stage}) on "
                                    f"device {owner}; move it there")
    ops = lower(program)

    ready: dict[Key, float] = {}
    waiters: dict[Key, list[int]] = defaultdict(list)
    blocked_on: dict[int, Key] = {}
    pos, clock, busy, compute_end = [0] * D, [0.0] * D, [0.0] * D, [0.0] * D
    held, peak, held_bytes, peak_bytes = [0] * D, [0] * D, [0.0] * D, [0.0] * D
    sync_issued: dict[tuple[int, int], tuple[int, float]] = {}
    events: list[TraceEvent] = []
    bytes_moved = 0.0
    n_messages = 0
    queue = deque(range(D))

    def publish(key: Key, t: float) -> None:
        ready[key] = t
        for d in waiters.pop(key, ()):
            blocked_on.pop(d, None)
            queue.append(d)

    while queue:
        d = queue.popleft()
        while pos[d] < len(ops[d]):
            op = ops[d][pos[d]]
            if isinstance(op, Comm) and op.op == "SEND":
                nbytes = _message_bytes(op.message, act_bytes)
                arrival = clock[d] + cost.p2p_time(nbytes)
                events.append(TraceEvent(d, str(op.message), "SEND", op.message.pipe, op.message.stage,
                                         op.message.microbatch, clock[d], arrival))
                bytes_moved += nbytes
                n_messages += 1
                publish(op.message, arrival)
            elif isinstance(op, Comm):  # RECV
                if op.message not in ready:
                    waiters[op.message].append(d)
                    blocked_on[d] = op.message
                    break
                clock[d] = max(clock[d], ready[op.message])
            elif op.kind == "SYNC":
                _issue_sync(d, op, clock[d], sync_issued)
            else:
                _check_compute(d, op, ready, sync_issued)
                wanted = _local_needs(program, d, op)
                missing = next((k for k in wanted if k not in ready), None)
                if missing is not None:
                    waiters[missing].append(d)
                    blocked_on[d] = missing
                    break
                start = max([clock[d], *(ready[k] for k in wanted)])
                end = start + durations[op.kind][op.stage]
                clock[d] = compute_end[d] = end
                busy[d] += end - start
                events.append(TraceEvent(d, str(op), op.kind, op.pipe, op.stage, op.microbatch, start, end))
                if op.kind == "F":
                    held[d] += 1
                    held_bytes[d] += act_bytes[op.stage]
                    peak[d] = max(peak[d], held[d])
                    peak_bytes[d] = max(peak_bytes[d], held_bytes[d])
                elif op.kind in ("B", "W"):
                    held[d] -= 1
                    held_bytes[d] -= act_bytes[op.stage]
                for key in provides(op):
                    publish(key, end)
            pos[d] += 1

    if any(pos[d] < len(ops[d]) for d in range(D)):
        raise ScheduleError(_deadlock_message(program, ops, pos, blocked_on))

    step_end = list(compute_end)
    for stage, (start, devices) in _allreduce_starts(program, sync_issued).items():
        n = len(devices) * cost.data_parallel
        end = start + cost.allreduce_time(param_bytes[stage], n)
        for d in devices:
            for p in (p for p in range(program.pipes) if place.device(p, stage) == d):
                events.append(TraceEvent(d, f"SYNC{p}.{stage}", "SYNC", p, stage, -1, start, end))
            step_end[d] = max(step_end[d], end)

    cross = {produced_message(program, a) for acts in program.device_actions for a in acts}
    produced = sum(1 for acts in program.device_actions for a in acts if produced_value(program, a) is not None)
    n_cross = len(cross - {None})
    chunks = [place.chunks(d) for d in range(D)]
    return SimReport(
        name=program.name,
        devices=D,
        stages=S,
        microbatches=program.microbatches,
        makespan=max(step_end, default=0.0),
        busy_times=tuple(busy),
        compute_end=tuple(compute_end),
        step_end=tuple(step_end),
        peak_activation_units=tuple(peak),
        peak_activation_byte_counts=tuple(peak_bytes),
        weight_chunks=tuple(len(c) for c in chunks),
        weight_byte_counts=tuple(sum(param_bytes[s] for _, s in c) for c in chunks),
        messages_cross=n_messages,
        local_handoffs=produced - n_cross,
        bytes_moved=bytes_moved,
        events=tuple(sorted(events, key=lambda e: (e.device, e.start, e.end))),
    )


def _check_compute(d: int, op: Action, ready: dict, sync_issued: dict) -> None:
    """Refuse an action that repeats work or runs after its chunk's SYNC."""
    for key in provides(op):
        if key in ready:
            raise ScheduleError(f"{op} on device {d} repeats work already done ({_describe(key)}); "
                                "each F, B (or I and W) runs once per micro-batch")
    if op.kind in ("B", "W") and op.chunk in sync_issued:
        raise ScheduleError(f"{op} on device {d} runs after SYNC{op.pipe}.{op.stage}; "
                            "move the SYNC after the chunk's last backward")


def _issue_sync(d: int, op: Action, t: float, sync_issued: dict) -> None:
    if op.chunk in sync_issued:
        raise ScheduleError(f"{op} appears twice on device {d}; each chunk has exactly one SYNC")
    sync_issued[op.chunk] = (d, t)


def _allreduce_starts(program: Program, sync_issued: dict) -> dict[int, tuple[float, tuple[int, ...]]]:
    """Per stage with SYNCs: (start = last member's issue time, member devices). All replicas must sync."""
    out = {}
    for stage in sorted({s for _, s in sync_issued}):
        missing = [p for p in range(program.pipes) if (p, stage) not in sync_issued]
        if missing:
            raise ScheduleError(
                f"the all-reduce of stage {stage} never starts: "
                + ", ".join(f"SYNC{p}.{stage} (device {program.placement.device(p, stage)})" for p in missing)
                + " is missing; every replica of a stage must issue its SYNC"
            )
        start = max(sync_issued[(p, stage)][1] for p in range(program.pipes))
        out[stage] = (start, program.placement.replica_devices(stage))
    return out


def _deadlock_message(program: Program, ops, pos: list[int], blocked_on: dict[int, Key]) -> str:
    lines = []
    for d in range(program.devices):
        if pos[d] >= len(ops[d]):
            continue
        op = ops[d][pos[d]]
        if isinstance(op, Comm):  # a RECV: name the action it feeds
            op = ops[d][pos[d] + 1]
        step = sum(1 for o in ops[d][: pos[d]] if isinstance(o, Action))  # index in the device's action list
        lines.append(f"device {d} stuck at step {step} ({op}) waiting for {_describe(blocked_on[d])}")
    return (f"program {program.name!r} deadlocks: " + "; ".join(lines)
            + ". Reorder the actions so that every producer runs before its consumer waits")
