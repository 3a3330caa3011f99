"""Deterministic dependency-driven list scheduling with unit timing.

Replays the work of every (pipe, stage, micro-batch) on its device in simulated time: whenever a device is
free it starts the best-ranked action whose inputs are ready, and otherwise waits for the next event. The
resulting per-device orders are what a generator returns; the timing only serves to choose them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import NamedTuple

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.depgraph import ActionGraph, action_graph
from bitpipe_fx.schedules.deps import Key, needs, provides
from bitpipe_fx.schedules.ir import Action, Placement


@dataclass(frozen=True)
class UnitCosts:
    """Time of one F and one full B (scalar, or one value per stage) and the W share of B.

    Used only to order actions; the same shape as the simulator's CostModel so a plan's costs carry over.
    """

    forward: float | tuple[float, ...] = 1.0
    backward: float | tuple[float, ...] = 2.0
    weight_fraction: float = 0.5

    def __post_init__(self) -> None:
        values = [*_as_tuple(self.forward), *_as_tuple(self.backward)]
        if not (values and all(v > 0 for v in values) and 0 < self.weight_fraction < 1):
            raise ScheduleError(
                f"unit costs need forward > 0, backward > 0 and 0 < weight_fraction < 1, got "
                f"forward={self.forward}, backward={self.backward}, weight_fraction={self.weight_fraction}"
            )

    def of(self, kind: str, stage: int) -> float:
        """Duration of one action of ``kind`` on ``stage``."""
        if kind == "F":
            return _at(self.forward, stage)
        b = _at(self.backward, stage)
        if kind == "B":
            return b
        return b * self.weight_fraction if kind == "W" else b * (1 - self.weight_fraction)

    def check_stages(self, stages: int) -> None:
        """Refuse per-stage tuples whose length is not the program's stage count."""
        for name, value in (("forward", self.forward), ("backward", self.backward)):
            if isinstance(value, tuple) and len(value) != stages:
                raise ScheduleError(
                    f"{name} costs have {len(value)} entries but the schedule has {stages} stages; give one "
                    "value per stage or a scalar"
                )


def _as_tuple(value: float | tuple[float, ...]) -> tuple[float, ...]:
    return value if isinstance(value, tuple) else (value,)


def _at(value: float | tuple[float, ...], stage: int) -> float:
    return value[stage] if isinstance(value, tuple) else value


class Timed(NamedTuple):
    """An action with its start and end in the list schedule's simulated time."""

    start: float
    end: float
    action: Action


class ListSchedule(NamedTuple):
    """A list schedule's per-device timed orders, and the makespan of those orders replayed (``makespan``)
    with the same costs: the replay runs each action as soon as its device and inputs allow, ignoring the
    admission rule, so it can finish earlier than the list schedule's own time."""

    orders: tuple[tuple[Timed, ...], ...]
    replayed: float
    costs: UnitCosts  # the costs both were timed with

    def actions(self) -> list[list[Action]]:
        """The per-device orders without their times."""
        return [[t.action for t in dev] for dev in self.orders]


@dataclass
class State:
    """What priority and admission rules may look at: the time, and when each started result (deps key) is ready."""

    time: float = 0.0
    done: dict[Key, float] = field(default_factory=dict)

    def finished(self, key: Key) -> bool:
        """True when ``key`` has been started and has ended by now."""
        return key in self.done and self.done[key] <= self.time


Priority = Callable[[Action, float], tuple]  # (action, ready time) -> sort key, smallest runs first
Admit = Callable[[Action, State], bool]  # may this (forward) action start now?


class _Ready:
    """One device's candidates whose inputs are ready: a heap by (priority, action id), and its W's by age.

    Action ids order like the actions (``depgraph``). ``taken`` (shared, by id) marks started actions, so a
    W taken through one heap is skipped in the other; W's are kept by age only when ``track_w``.
    """

    def __init__(self, taken: bytearray, track_w: bool) -> None:
        self.heap: list[tuple[tuple, int]] = []
        self.w_heap: list[tuple[float, int]] = []
        self.w_count = 0
        self.taken, self.track_w = taken, track_w

    def add(self, i: int, action: Action, at: float, priority: Priority) -> None:
        heappush(self.heap, (priority(action, at), i))
        if self.track_w and action.kind == "W":
            heappush(self.w_heap, (at, i))
            self.w_count += 1

    def take(
        self, actions: tuple[Action, ...], admit: Admit | None, state: State, max_deferred_w: int | None
    ) -> int | None:
        """The best admitted candidate (or, with ``max_deferred_w`` ready W's, the oldest W), or None."""
        heap, taken, refused, best = self.heap, self.taken, [], None
        while heap:
            entry = heappop(heap)
            if taken[entry[1]]:
                continue
            if admit is None or admit(actions[entry[1]], state):
                best = entry
                break
            refused.append(entry)
        for entry in refused:
            heappush(heap, entry)
        if best is None:
            return None
        i = best[1]
        if max_deferred_w is not None and self.w_count >= max_deferred_w:
            heappush(heap, best)
            i = heappop(self.w_heap)[1]
            while taken[i]:
                i = heappop(self.w_heap)[1]
        taken[i] = 1
        if self.track_w and actions[i].kind == "W":
            self.w_count -= 1
        return i


def list_schedule(
    placement: Placement,
    pipe_of: Sequence[int],
    priority: Priority,
    costs: UnitCosts = UnitCosts(),
    split: bool = False,
    admit: Admit | None = None,
    max_deferred_w: int | None = None,
) -> ListSchedule:
    """Per-device timed orders of a greedy list schedule of every micro-batch's F and B (or I and W).

    At every event time each free device starts its smallest ready ``(priority, action)`` that ``admit``
    lets in. With ``max_deferred_w``, a device that holds that many ready W actions runs the oldest one
    next, which bounds the activations kept alive by deferred weight-gradient work. The replay of the
    orders is timed along the way (each action's needs have started, so their replayed ends are known).
    """
    stages, devices = placement.stages, placement.devices
    costs.check_stages(stages)
    graph = action_graph(placement, pipe_of, split)
    actions, device, needs_of, provides_of = graph.actions, graph.device, graph.needs, graph.provides
    dependents = graph.dependents
    duration = _durations(graph, costs, stages)
    state = State()
    done = state.done
    taken = bytearray(len(actions))
    ready = [_Ready(taken, max_deferred_w is not None) for _ in range(devices)]
    left = [len(n) for n in needs_of]  # needs of each action not yet started
    ready_at = [0.0] * len(actions)  # the latest end among its started needs
    # candidates whose inputs are all started, by the time the last one ends (always an event time)
    later: dict[float, list[int]] = {0.0: list(graph.roots)}
    remaining = len(actions)
    free = [0.0] * devices
    replay_free, replay_done = [0.0] * devices, {}  # the replay's device clocks and result ends
    orders: list[list[Timed]] = [[] for _ in range(devices)]
    events, pending = [0.0], {0.0}  # future event times, as a heap and as a set
    while remaining:
        if not events:
            raise ScheduleError(
                f"list scheduling stalled with {remaining} actions left: the admission rule never lets "
                "the remaining forwards start; relax it"
            )
        now = heappop(events)
        pending.discard(now)
        state.time = now
        for i in later.pop(now, ()):
            ready[device[i]].add(i, actions[i], now, priority)
        for d, waiting in enumerate(ready):
            if not waiting.heap or free[d] > now:
                continue
            i = waiting.take(actions, admit, state, max_deferred_w)
            if i is None:
                continue
            remaining -= 1
            end = free[d] = now + duration[i]
            orders[d].append(Timed(now, end, actions[i]))
            start = replay_free[d]
            for key in needs_of[i]:
                if replay_done[key] > start:
                    start = replay_done[key]
            replayed = replay_free[d] = start + duration[i]
            if end not in pending:
                pending.add(end)
                heappush(events, end)
            for key in provides_of[i]:
                done[key] = end
                replay_done[key] = replayed
                for j in dependents.get(key, ()):
                    if end > ready_at[j]:
                        ready_at[j] = end
                    left[j] -= 1
                    if left[j]:
                        continue
                    at = ready_at[j]
                    if at <= now:
                        ready[device[j]].add(j, actions[j], at, priority)
                    else:
                        later.setdefault(at, []).append(j)
                    if at not in pending:
                        pending.add(at)
                        heappush(events, at)
    return ListSchedule(tuple(tuple(o) for o in orders), max(replay_free, default=0.0), costs)


def _durations(graph: ActionGraph, costs: UnitCosts, stages: int) -> list[float]:
    """Each action's time under ``costs``, by id."""
    of = {(k, s): costs.of(k, s) for k in ("F", "B", "I", "W") for s in range(stages)}
    return [of[a.kind, a.stage] for a in graph.actions]


def makespan(
    placement: Placement, orders: Sequence[Sequence[Action]], costs: UnitCosts, pipe_of: Sequence[int] | None = None
) -> float:
    """Finish time of fixed per-device orders replayed with ``costs`` (free communication).

    With ``pipe_of`` (the micro-batch -> pipe map the orders were made for) the replay reads each action's
    needs and results from the shared ``depgraph`` instead of deriving them; the result is the same.
    """
    stages = placement.stages
    costs.check_stages(stages)
    duration = {(k, s): costs.of(k, s) for k in ("F", "B", "I", "W") for s in range(stages)}
    split = any(a.kind == "W" for order in orders[:1] for a in order)
    graph = action_graph(placement, pipe_of, split) if pipe_of is not None else None
    index = graph.index if graph is not None else {}
    graph_needs, graph_results = (graph.needs, graph.provides) if graph is not None else ((), ())
    done: dict[Key, float] = {}
    waiting: dict[Key, list[int]] = {}  # a missing result -> the devices blocked on it
    pos = [0] * len(orders)
    free = [0.0] * len(orders)
    runnable = list(range(len(orders)))
    while runnable:
        d = runnable.pop()
        order, i, now = orders[d], pos[d], free[d]
        while i < len(order):
            a = order[i]
            known = index.get(a)
            if known is None:
                need, made = needs(a, stages), provides(a)
            else:
                need, made = graph_needs[known], graph_results[known]
            start, missing = now, None
            for key in need:
                end = done.get(key)
                if end is None:
                    missing = key
                    break
                if end > start:
                    start = end
            if missing is not None:
                waiting.setdefault(missing, []).append(d)
                break
            now = start + duration[a.kind, a.stage]
            for key in made:
                done[key] = now
                if key in waiting:
                    runnable.extend(waiting.pop(key))
            i += 1
        pos[d], free[d] = i, now
    if any(p < len(o) for p, o in zip(pos, orders)):
        raise ScheduleError("cannot time these orders: they deadlock; run validate() on the program for details")
    return max(free, default=0.0)
