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
from bitpipe_fx.schedules.build import DeviceOrder
from bitpipe_fx.schedules.costed import fastest, unit_costs
from bitpipe_fx.schedules.ir import Action, Program, v_placement
from bitpipe_fx.schedules.registry import register
from bitpipe_fx.sim.cost import CostModel


def _device_order(devices: int, microbatches: int, d: int) -> list[Action]:
    """The ZB-V phases of device d."""
    dev = DeviceOrder((d, 2 * devices - 1 - d), microbatches)
    dev.run(2 * (devices - d) - 1, "F0")  # warm-up: the down leg of the V
    dev.run(d, "F1 F0")  # warm-up: the up leg starts
    dev.run(devices - d, "F1 I1 W1")  # the first backwards, at the turn
    while dev.count("F", 0) < microbatches or dev.count("F", 1) < dev.count("F", 0):
        dev.run(1, "F0 I0 W0 F1 I1 W1")  # steady state: 1F1B on both chunks
    dev.run(d, "I0 I1")  # cool-down: input gradients first, their W's deferred
    dev.run(devices - d, "I0 W0")
    dev.run(dev.deferred(1), "W1")  # the deferred W's
    dev.run(dev.deferred(0), "W0")
    return dev.actions


@register("zbv")
def zbv(devices: int, microbatches: int, defer_w: int | None = None, costs: CostModel | None = None) -> Program:
    """The ZB-V order for D devices and N micro-batches, W held back by ``defer_w`` (None: chosen by ``costs``)."""
    if defer_w is not None and (not isinstance(defer_w, int) or defer_w < 0):
        raise ScheduleError(f"zbv defer_w must be a non-negative integer (W's held back) or None, got {defer_w!r}")
    place = v_placement(devices)
    pipe_of = [0] * microbatches
    lags = (defer_w,) if defer_w is not None else (0,) if costs is None else sorted({0, 1, 2, devices // 2, devices})
    published = [_device_order(devices, microbatches, d) for d in range(devices)]
    candidates = [[_held_back(acts, lag) for acts in published] for lag in lags]
    return fastest("zbv", place, pipe_of, candidates, costs, unit_costs(costs))


def _held_back(actions: list[Action], lag: int) -> list[Action]:
    """``actions`` with each W emitted only once more than ``lag`` W's wait behind it (F/I order unchanged)."""
    out: list[Action] = []
    held: deque[Action] = deque()
    for a in actions:
        if a.kind != "W":
            out.append(a)
            continue
        held.append(a)
        while len(held) > lag:
            out.append(held.popleft())
    return out + list(held)
