"""ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", 2024): V placement, backward split into I and W.

Device d holds chunk 0 = stage d and chunk 1 = stage 2D-1-d. Its order has the paper's phases: 2(D-d)-1
chunk-0 forwards; d pairs (F1, F0); D-d triples (F1, I1, W1); the steady state (F0, I0, W0, F1, I1, W1)
until every forward ran; a cool-down of d pairs (I0, I1) and D-d pairs (I0, W0); then the deferred W's.
Actions past the last micro-batch are skipped, so any N works.

``defer_w=k`` holds up to k weight gradients back behind later F and I work on that device (each W only
needs its own I, so any lag is valid and the F/I order is unchanged); None tries 0, 1, 2, D/2 and D under
``costs`` (the plan's CostModel) and keeps the fastest in the simulator (the smallest lag on a tie), and is
0, the paper's order, without costs.
"""

from __future__ import annotations

from collections import deque

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.costed import fastest, unit_costs
from bitpipe_fx.schedules.ir import Action, Program, v_placement
from bitpipe_fx.schedules.registry import register
from bitpipe_fx.sim.cost import CostModel


@register("zbv")
def zbv(devices: int, microbatches: int, defer_w: int | None = None, costs: CostModel | None = None) -> Program:
    """The ZB-V order for D devices and N micro-batches, W held back by ``defer_w`` (None: chosen by ``costs``)."""
    if defer_w is not None and (not isinstance(defer_w, int) or defer_w < 0):
        raise ScheduleError(f"zbv defer_w must be a non-negative integer (W's held back) or None, got {defer_w!r}")
    place = v_placement(devices)
    pipe_of = [0] * microbatches
    lags = (defer_w,) if defer_w is not None else (0,) if costs is None else sorted({0, 1, 2, devices // 2, devices})
    candidates = [_orders(devices, microbatches, lag) for lag in lags]
    return fastest("zbv", place, pipe_of, candidates, costs, unit_costs(costs))


def _orders(devices: int, microbatches: int, lag: int) -> list[list[Action]]:
    """Per-device ZB-V orders with each W emitted once more than ``lag`` W's wait behind it."""
    per_device = []
    for d in range(devices):
        stage_of = {0: d, 1: 2 * devices - 1 - d}
        count = {(k, c): 0 for k in "FIW" for c in (0, 1)}
        acts: list[Action] = []
        held: deque[Action] = deque()

        def run(kind: str, chunk: int, acts=acts, count=count, stage_of=stage_of, held=held) -> None:
            mb = count[kind, chunk]
            if mb < microbatches:
                (held if kind == "W" else acts).append(Action(kind, 0, stage_of[chunk], mb))
                count[kind, chunk] += 1
                while len(held) > lag:
                    acts.append(held.popleft())

        for _ in range(2 * (devices - d) - 1):
            run("F", 0)
        for _ in range(d):
            run("F", 1)
            run("F", 0)
        for _ in range(devices - d):
            run("F", 1)
            run("I", 1)
            run("W", 1)
        while count["F", 0] < microbatches or count["F", 1] < count["F", 0]:
            for chunk in (0, 1):
                run("F", chunk)
                run("I", chunk)
                run("W", chunk)
        for _ in range(d):
            run("I", 0)
            run("I", 1)
        for _ in range(devices - d):
            run("I", 0)
            run("W", 0)
        for chunk in (1, 0):
            while count["W", chunk] < count["I", chunk]:
                run("W", chunk)
        acts.extend(held)
        per_device.append(acts)
    return per_device
