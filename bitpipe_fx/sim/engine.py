"""Event-driven replay of a Program under a CostModel.

Semantics (the runtime's, idealised):
- each device runs its actions in order, one compute at a time, each cross-device value (``comm.handoffs``)
  received right before its consumer and sent right after its producer (``comm.lower``'s order);
- a SEND costs the sender nothing and the message arrives ``p2p_latency + bytes/p2p_bandwidth`` later;
  a RECV blocks its device until the message has arrived; links have no contention;
- a local hand-off (producer and consumer chunk on one device) is free and needs only program order;
- SYNC costs the device nothing; the all-reduce of a stage's gradients starts once every replica of the
  stage has issued its SYNC and takes ``α + 2(n-1)/n · param_bytes/β`` over n = replica devices × data_parallel;
- a device's step ends when its last compute is done and all its all-reduces are done.
"""

from __future__ import annotations

from collections import deque

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.comm import Handoff, Wired, handoffs, message_of
from bitpipe_fx.schedules.deps import ACTIVATION, Key, describe
from bitpipe_fx.schedules.ir import COMPUTE_KINDS, Action, Program
from bitpipe_fx.sim.cost import CostModel
from bitpipe_fx.sim.report import SimReport, Span

Wait = tuple[Key, Handoff | None]  # what a device waits for: a local result (None), or the arrival of a message
# one action, prepared: (action, local needs, value received from another device, results, value sent to another
# device, compute time, bytes sent, send-to-arrival time)
Step = tuple[Action, tuple[Key, ...], Handoff | None, tuple[Key, ...], Handoff | None, float, float, float]


def _value_bytes(key: Key, act_bytes: tuple[float, ...]) -> float:
    """An activation of stage s has stage s's output size; a gradient from stage s, stage s-1's output size."""
    return act_bytes[key[2]] if key[0] == ACTIVATION else act_bytes[key[2] - 1]


def _steps(
    program: Program, wiring: tuple[tuple[Wired, ...], ...], cost: CostModel, act_bytes: tuple[float, ...]
) -> list[list[Step]]:
    """Every device's actions with what they wait for and send (``wiring`` = ``comm.handoffs(program)``)."""
    S = program.stages
    durations = {k: tuple(cost.compute_time(k, s, S) for s in range(S)) for k in COMPUTE_KINDS}
    out = []
    for row in wiring:
        steps = []
        for a, need, made, inbound, outbound in row:
            recv = inbound if inbound is not None and inbound[1] != inbound[2] else None
            send = outbound if outbound is not None and outbound[1] != outbound[2] else None
            local = need if recv is None else tuple(k for k in need if k != recv[0])
            duration = durations[a.kind][a.stage] if a.kind != "SYNC" else 0.0
            nbytes = _value_bytes(send[0], act_bytes) if send is not None else 0.0
            delay = cost.p2p_time(nbytes) if send is not None else 0.0
            steps.append((a, local, recv, made, send, duration, nbytes, delay))
        out.append(steps)
    return out


def _describe(wait: Wait) -> str:
    key, message = wait
    return describe(key) if message is None else f"message {message_of(message)}"


def simulate(program: Program, cost: CostModel | None = None) -> SimReport:
    """Replay ``program`` under ``cost``; raises ScheduleError when it deadlocks or is inconsistent."""
    cost = cost or CostModel()
    D, S = program.devices, program.stages
    place = program.placement
    act_bytes = cost.per_stage("activation_bytes", S)
    param_bytes = cost.per_stage("param_bytes", S)
    for d, acts in enumerate(program.device_actions):
        mine = set(place.chunks(d))
        for a in (a for a in acts if (a.pipe, a.stage) not in mine):
            if not (0 <= a.pipe < program.pipes and 0 <= a.stage < S):
                raise ScheduleError(f"{a} on device {d} names chunk ({a.pipe}, {a.stage}), which the placement "
                                    f"lacks ({program.pipes} pipes x {S} stages)")
            if (owner := place.device(a.pipe, a.stage)) != d:
                raise ScheduleError(f"{a} is on device {d} but the placement puts ({a.pipe}, {a.stage}) on "
                                    f"device {owner}; move it there")
    wiring = handoffs(program)
    steps = _steps(program, wiring, cost, act_bytes)

    ready: dict[Key, float] = {}  # a local result -> when its action ended
    arrived: dict[Key, float] = {}  # a cross-device value -> when it reached its destination
    waiting_local: dict[Key, list[int]] = {}  # a local result -> the devices blocked on it
    waiting_message: dict[Key, list[int]] = {}  # a cross-device value -> the devices blocked on its arrival
    blocked_on: dict[int, Wait] = {}
    pos, clock, busy, compute_end = [0] * D, [0.0] * D, [0.0] * D, [0.0] * D
    held, peak, held_bytes, peak_bytes = [0] * D, [0] * D, [0.0] * D, [0.0] * D
    sync_issued: dict[tuple[int, int], tuple[int, float]] = {}
    spans: list[Span] = []
    bytes_moved = 0.0
    n_messages = 0
    queue = deque(range(D))

    def wake(waiting: dict[Key, list[int]], key: Key) -> None:
        for d in waiting.pop(key):
            blocked_on.pop(d, None)
            queue.append(d)

    while queue:
        d = queue.popleft()
        row, i, now, busy_d = steps[d], pos[d], clock[d], busy[d]
        h, hb, top, top_bytes = held[d], held_bytes[d], peak[d], peak_bytes[d]
        while i < len(row):
            op, local, recv, results, send, duration, nbytes, delay = row[i]
            kind = op.kind
            if kind == "SYNC":
                _issue_sync(d, op, now, sync_issued)
                i += 1
                continue
            if recv is not None:
                if recv[0] not in arrived:
                    waiting_message.setdefault(recv[0], []).append(d)
                    blocked_on[d] = (recv[0], recv)
                    break
                if arrived[recv[0]] > now:
                    now = arrived[recv[0]]
            if (sync_issued and kind in ("B", "W") and (op.pipe, op.stage) in sync_issued) or results[0] in ready \
                    or results[-1] in ready:
                _check_compute(d, op, results, ready, sync_issued)  # raises: repeated work, or after SYNC
            start, missing = now, None
            for key in local:
                at = ready.get(key)
                if at is None:
                    missing = key
                    break
                if at > start:
                    start = at
            if missing is not None:
                waiting_local.setdefault(missing, []).append(d)
                blocked_on[d] = (missing, None)
                break
            end = start + duration
            now = end
            busy_d += end - start
            spans.append((d, start, end, op))
            if kind == "F":
                h += 1
                hb += act_bytes[op.stage]
                if h > top:
                    top = h
                if hb > top_bytes:
                    top_bytes = hb
            elif kind in ("B", "W"):
                h -= 1
                hb -= act_bytes[op.stage]
            for key in results:
                ready[key] = end
                if key in waiting_local:
                    wake(waiting_local, key)
            if send is not None:
                arrival = end + delay
                spans.append((d, end, arrival, send))
                bytes_moved += nbytes
                n_messages += 1
                arrived[send[0]] = arrival
                if send[0] in waiting_message:
                    wake(waiting_message, send[0])
            i += 1
            compute_end[d] = end
        pos[d], clock[d], busy[d] = i, now, busy_d
        held[d], held_bytes[d], peak[d], peak_bytes[d] = h, hb, top, top_bytes

    if any(pos[d] < len(steps[d]) for d in range(D)):
        raise ScheduleError(_deadlock_message(program, steps, pos, blocked_on))

    step_end = list(compute_end)
    for stage, (start, devices) in _allreduce_starts(program, sync_issued).items():
        n = len(devices) * cost.data_parallel
        end = start + cost.allreduce_time(param_bytes[stage], n)
        for d in devices:
            for p in (p for p in range(program.pipes) if place.device(p, stage) == d):
                spans.append((d, start, end, Action("SYNC", p, stage)))
            step_end[d] = max(step_end[d], end)

    outbound = [w[4] for row in wiring for w in row if w[4] is not None]
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
        local_handoffs=sum(1 for _, src, dst in outbound if src == dst),
        bytes_moved=bytes_moved,
        spans=tuple(spans),
    )


def _check_compute(d: int, op: Action, results: tuple[Key, ...], ready: dict, sync_issued: dict) -> None:
    """Refuse an action that repeats work (one of its ``results`` exists) or runs after its chunk's SYNC."""
    for key in results:
        if key in ready:
            raise ScheduleError(f"{op} on device {d} repeats work already done ({describe(key)}); "
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


def _deadlock_message(program: Program, steps: list[list[Step]], pos: list[int], blocked_on: dict[int, Wait]) -> str:
    lines = [f"device {d} stuck at step {pos[d]} ({steps[d][pos[d]][0]}) waiting for {_describe(blocked_on[d])}"
             for d in range(program.devices) if pos[d] < len(steps[d])]
    return (f"program {program.name!r} deadlocks: " + "; ".join(lines)
            + ". Reorder the actions so that every producer runs before its consumer waits")
