"""Deterministic dependency-driven list scheduling with unit timing.

Replays the work of every (pipe, stage, micro-batch) on its device in simulated time: whenever a device is
free it starts the best-ranked action whose inputs are ready, and otherwise waits for the next event. The
resulting per-device orders are what a generator returns; the timing only serves to choose them.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.deps import Key, dependents, needs, provides
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


@dataclass(frozen=True)
class Timed:
    """An action with its start and end in the list schedule's simulated time."""

    start: float
    end: float
    action: Action


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


def list_schedule(
    placement: Placement,
    pipe_of: Sequence[int],
    priority: Priority,
    costs: UnitCosts = UnitCosts(),
    split: bool = False,
    admit: Admit | None = None,
    max_deferred_w: int | None = None,
) -> tuple[tuple[Timed, ...], ...]:
    """Per-device timed orders of a greedy list schedule of every micro-batch's F and B (or I and W).

    With ``max_deferred_w``, a device that holds that many ready W actions runs the oldest one next, which
    bounds the activations kept alive by deferred weight-gradient work.
    """
    stages, devices = placement.stages, placement.devices
    costs.check_stages(stages)
    state = State()
    candidates: list[dict[Action, float]] = [{} for _ in range(devices)]  # all inputs started -> ready time
    for m, p in enumerate(pipe_of):
        candidates[placement.device(p, 0)][Action("F", p, 0, m)] = 0.0
    remaining = len(pipe_of) * stages * (3 if split else 2)
    free = [0.0] * devices
    orders: list[list[Timed]] = [[] for _ in range(devices)]
    events = [0.0]
    while remaining:
        if not events:
            raise ScheduleError(
                f"list scheduling stalled with {remaining} actions left: the admission rule never lets "
                "the remaining forwards start; relax it"
            )
        now = heapq.heappop(events)
        while events and events[0] <= now:
            heapq.heappop(events)
        state.time = now
        for d in range(devices):
            if free[d] > now or not candidates[d]:
                continue
            ready = [
                (priority(a, at), a)
                for a, at in candidates[d].items()
                if at <= now and (admit is None or admit(a, state))
            ]
            if not ready:
                continue
            waiting_w = [(at, a) for a, at in candidates[d].items() if a.kind == "W" and at <= now]
            if max_deferred_w is not None and len(waiting_w) >= max_deferred_w:
                a = min(waiting_w)[1]
            else:
                a = min(ready)[1]
            del candidates[d][a]
            remaining -= 1
            free[d] = now + costs.of(a.kind, a.stage)
            heapq.heappush(events, free[d])
            orders[d].append(Timed(now, free[d], a))
            for key in provides(a):
                state.done[key] = free[d]
                for nxt in dependents(key, stages, split):
                    need = needs(nxt, stages)
                    if all(k in state.done for k in need):
                        at = max(state.done[k] for k in need)
                        candidates[placement.device(nxt.pipe, nxt.stage)][nxt] = at
                        heapq.heappush(events, at)
    return tuple(tuple(o) for o in orders)


def makespan(placement: Placement, orders: Sequence[Sequence[Action]], costs: UnitCosts) -> float:
    """Finish time of fixed per-device orders replayed with ``costs`` (free communication)."""
    stages = placement.stages
    costs.check_stages(stages)
    done: dict[Key, float] = {}
    pos = [0] * len(orders)
    free = [0.0] * len(orders)
    progress = True
    while progress:
        progress = False
        for d, order in enumerate(orders):
            while pos[d] < len(order):
                a = order[pos[d]]
                need = needs(a, stages)
                if not all(k in done for k in need):
                    break
                free[d] = max([free[d], *(done[k] for k in need)]) + costs.of(a.kind, a.stage)
                for key in provides(a):
                    done[key] = free[d]
                pos[d] += 1
                progress = True
    if any(p < len(o) for p, o in zip(pos, orders)):
        raise ScheduleError("cannot time these orders: they deadlock; run validate() on the program for details")
    return max(free, default=0.0)
