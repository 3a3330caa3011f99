"""The list scheduler and the event simulator as they were before the heap rewrite (main at 96022bb).

A test-side reference only: the rescanning list scheduler, the sweeping ``makespan`` and the queue-driven
simulator with its own send/recv derivation, kept compact and independent of bitpipe_fx.schedules.deps and
.comm so that the fast versions can be compared with them result for result. Valid programs only: the
error paths are tested against the product directly.
"""

from __future__ import annotations

import heapq
from collections import defaultdict, deque

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.comm import Message
from bitpipe_fx.schedules.ir import COMPUTE_KINDS, Action, Placement, Program
from bitpipe_fx.schedules.listsched import State, Timed, UnitCosts
from bitpipe_fx.sim.cost import CostModel
from bitpipe_fx.sim.trace import TraceEvent


def _deps(a: Action, stages: int) -> tuple:
    p, s, m = a.pipe, a.stage, a.microbatch
    if a.kind == "F":
        return (("F", p, s - 1, m),) if s > 0 else ()
    if a.kind in ("B", "I"):
        return (("F", p, s, m),) + ((("B/I", p, s + 1, m),) if s + 1 < stages else ())
    return (("I", p, s, m),)


def _dependents(key: tuple, stages: int, back: tuple[str, ...]) -> list[Action]:
    kind, p, s, m = key
    if kind == "F":
        return [*([Action("F", p, s + 1, m)] if s + 1 < stages else []), Action(back[0], p, s, m)]
    if kind == "B/I":
        return [Action(back[0], p, s - 1, m)] if s > 0 else []
    return [Action("W", p, s, m)] if kind == "I" else []


def list_schedule(placement: Placement, pipe_of, priority, costs: UnitCosts, split: bool = False, admit=None,
                  max_deferred_w: int | None = None) -> tuple[tuple[Timed, ...], ...]:
    """The old greedy list schedule: every event time, every free device rescans all its candidates."""
    stages, devices = placement.stages, placement.devices
    back = ("I", "W") if split else ("B",)
    state = State()
    candidates: list[dict[Action, float]] = [{} for _ in range(devices)]
    for m, p in enumerate(pipe_of):
        candidates[placement.device(p, 0)][Action("F", p, 0, m)] = 0.0
    remaining = len(pipe_of) * stages * (1 + len(back))
    free = [0.0] * devices
    orders: list[list[Timed]] = [[] for _ in range(devices)]
    events = [0.0]
    while remaining:
        if not events:
            raise ScheduleError("list scheduling stalled")
        now = heapq.heappop(events)
        while events and events[0] <= now:
            heapq.heappop(events)
        state.time = now
        for d in range(devices):
            if free[d] > now or not candidates[d]:
                continue
            ready = [(priority(a, at), a) for a, at in candidates[d].items()
                     if at <= now and (admit is None or admit(a, state))]
            if not ready:
                continue
            waiting_w = [(at, a) for a, at in candidates[d].items() if a.kind == "W" and at <= now]
            a = min(waiting_w)[1] if max_deferred_w is not None and len(waiting_w) >= max_deferred_w else min(ready)[1]
            del candidates[d][a]
            remaining -= 1
            free[d] = now + costs.of(a.kind, a.stage)
            heapq.heappush(events, free[d])
            orders[d].append(Timed(now, free[d], a))
            keys = [(a.kind, a.pipe, a.stage, a.microbatch)]
            keys += [("B/I", a.pipe, a.stage, a.microbatch)] if a.kind in ("B", "I") else []
            for key in keys:
                state.done[key] = free[d]
                for nxt in _dependents(key, stages, back):
                    need = _deps(nxt, stages)
                    if all(k in state.done for k in need):
                        at = max(state.done[k] for k in need)
                        candidates[placement.device(nxt.pipe, nxt.stage)][nxt] = at
                        heapq.heappush(events, at)
    return tuple(tuple(o) for o in orders)


def makespan(placement: Placement, orders, costs: UnitCosts) -> float:
    """The old replay of fixed orders: sweep the devices until nothing moves."""
    stages = placement.stages
    done: dict = {}
    pos, free = [0] * len(orders), [0.0] * len(orders)
    progress = True
    while progress:
        progress = False
        for d, order in enumerate(orders):
            while pos[d] < len(order):
                a = order[pos[d]]
                need = _deps(a, stages)
                if not all(k in done for k in need):
                    break
                free[d] = max([free[d], *(done[k] for k in need)]) + costs.of(a.kind, a.stage)
                done[(a.kind, a.pipe, a.stage, a.microbatch)] = free[d]
                if a.kind in ("B", "I"):
                    done[("B/I", a.pipe, a.stage, a.microbatch)] = free[d]
                pos[d] += 1
                progress = True
    if any(p < len(o) for p, o in zip(pos, orders)):
        raise ScheduleError("orders deadlock")
    return max(free, default=0.0)


def _value(program: Program, a: Action, produced: bool) -> Message | None:
    """The old comm derivation: the message ``a`` produces (or consumes) across devices, or None."""
    s, last = a.stage, program.stages - 1
    if a.kind == "F" and (s < last if produced else s > 0):
        kind, other = "act", s + 1 if produced else s - 1
    elif a.kind in ("B", "I") and (s > 0 if produced else s < last):
        kind, other = "grad", s - 1 if produced else s + 1
    else:
        return None
    place = program.placement
    src, dst = (s, other) if produced else (other, s)
    msg = Message(kind, a.pipe, src, a.microbatch, place.device(a.pipe, src), place.device(a.pipe, dst))
    return msg if msg.src != msg.dst else None


def simulate(program: Program, cost: CostModel) -> dict:
    """The old event simulator on a valid program: its report's fields (and events) by name."""
    D, S = program.devices, program.stages
    place = program.placement
    act_bytes, param_bytes = cost.per_stage("activation_bytes", S), cost.per_stage("param_bytes", S)
    durations = {k: tuple(cost.compute_time(k, s, S) for s in range(S)) for k in COMPUTE_KINDS}
    ops = []
    for acts in program.device_actions:
        row: list = []
        for a in acts:
            row += [("RECV", m)] if (m := _value(program, a, False)) else []
            row.append(a)
            row += [("SEND", m)] if (m := _value(program, a, True)) else []
        ops.append(row)
    ready: dict = {}
    waiters: dict = defaultdict(list)
    pos, clock, busy, compute_end = [0] * D, [0.0] * D, [0.0] * D, [0.0] * D
    held, peak, held_bytes, peak_bytes = [0] * D, [0] * D, [0.0] * D, [0.0] * D
    sync_issued: dict = {}
    events: list[TraceEvent] = []
    bytes_moved, n_messages = 0.0, 0
    queue = deque(range(D))

    def publish(key, t: float) -> None:
        ready[key] = t
        queue.extend(waiters.pop(key, ()))

    while queue:
        d = queue.popleft()
        while pos[d] < len(ops[d]):
            op = ops[d][pos[d]]
            if not isinstance(op, Action) and op[0] == "SEND":
                msg = op[1]
                nbytes = act_bytes[msg.stage] if msg.kind == "act" else act_bytes[msg.stage - 1]
                arrival = clock[d] + cost.p2p_time(nbytes)
                events.append(TraceEvent(d, str(msg), "SEND", msg.pipe, msg.stage, msg.microbatch, clock[d], arrival))
                bytes_moved += nbytes
                n_messages += 1
                publish(msg, arrival)
            elif not isinstance(op, Action):
                if op[1] not in ready:
                    waiters[op[1]].append(d)
                    break
                clock[d] = max(clock[d], ready[op[1]])
            elif op.kind == "SYNC":
                sync_issued[op.chunk] = (d, clock[d])
            else:
                p, s, m = op.pipe, op.stage, op.microbatch
                needs = {"F": [("F", p, s - 1, m)] if s > 0 and _value(program, op, False) is None else [],
                         "W": [("G", p, s, m)]}.get(op.kind)
                if needs is None:
                    local = s + 1 < S and _value(program, op, False) is None
                    needs = [("F", p, s, m), *([("G", p, s + 1, m)] if local else [])]
                missing = next((k for k in needs if k not in ready), None)
                if missing is not None:
                    waiters[missing].append(d)
                    break
                start = max([clock[d], *(ready[k] for k in needs)])
                end = start + durations[op.kind][op.stage]
                clock[d] = compute_end[d] = end
                busy[d] += end - start
                events.append(TraceEvent(d, str(op), op.kind, p, s, m, start, end))
                if op.kind == "F":
                    held[d] += 1
                    held_bytes[d] += act_bytes[s]
                    peak[d], peak_bytes[d] = max(peak[d], held[d]), max(peak_bytes[d], held_bytes[d])
                elif op.kind in ("B", "W"):
                    held[d] -= 1
                    held_bytes[d] -= act_bytes[s]
                produces = {"F": [("F", p, s, m)], "B": [("G", p, s, m), ("W", p, s, m)], "I": [("G", p, s, m)],
                            "W": [("W", p, s, m)]}[op.kind]
                for key in produces:
                    publish(key, end)
            pos[d] += 1
    if any(pos[d] < len(ops[d]) for d in range(D)):
        raise ScheduleError("program deadlocks")
    step_end = list(compute_end)
    for stage in sorted({s for _, s in sync_issued}):
        start = max(sync_issued[(p, stage)][1] for p in range(program.pipes))
        devices = place.replica_devices(stage)
        end = start + cost.allreduce_time(param_bytes[stage], len(devices) * cost.data_parallel)
        for d in devices:
            for p in (p for p in range(program.pipes) if place.device(p, stage) == d):
                events.append(TraceEvent(d, f"SYNC{p}.{stage}", "SYNC", p, stage, -1, start, end))
            step_end[d] = max(step_end[d], end)
    cross = {_value(program, a, True) for acts in program.device_actions for a in acts}
    produced = sum(1 for acts in program.device_actions for a in acts
                   if (a.kind == "F" and a.stage + 1 < S) or (a.kind in ("B", "I") and a.stage > 0))
    chunks = [place.chunks(d) for d in range(D)]
    return dict(
        name=program.name, devices=D, stages=S, microbatches=program.microbatches,
        makespan=max(step_end, default=0.0), busy_times=tuple(busy), compute_end=tuple(compute_end),
        step_end=tuple(step_end), peak_activation_units=tuple(peak), peak_activation_byte_counts=tuple(peak_bytes),
        weight_chunks=tuple(len(c) for c in chunks),
        weight_byte_counts=tuple(sum(param_bytes[s] for _, s in c) for c in chunks),
        messages_cross=n_messages, local_handoffs=produced - len(cross - {None}), bytes_moved=bytes_moved,
        events=tuple(sorted(events, key=lambda e: (e.device, e.start, e.end))),
    )
