"""ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", 2024): V placement, backward split into I and W.

Device d holds chunk 0 = stage d and chunk 1 = stage 2D-1-d. Its order has the paper's phases: a warm-up of
2(D-d)-1 chunk-0 forwards, then d pairs (F1, F0); the first backwards at the turn, D-d triples (F1, I1, W1);
the steady state, 1F1B on both chunks with each W right after its I, (F0, I0, W0, F1, I1, W1) until every
forward ran; a cool-down of d pairs (I0, I1) and D-d pairs (I0, W0), deferring the W's it cannot fit; then
the deferred W's. Actions past the last micro-batch are skipped, so any N works.
"""

from __future__ import annotations

from bitpipe_fx.schedules.build import DeviceOrder, assemble
from bitpipe_fx.schedules.ir import Action, Program, v_placement
from bitpipe_fx.schedules.registry import register


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
def zbv(devices: int, microbatches: int) -> Program:
    """The ZB-V order for D devices and N micro-batches."""
    per_device = [_device_order(devices, microbatches, d) for d in range(devices)]
    return assemble("zbv", v_placement(devices), [0] * microbatches, per_device)
