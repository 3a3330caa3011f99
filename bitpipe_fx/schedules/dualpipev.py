"""DualPipeV (DeepSeek, the "cut-in-half" DualPipe): V placement, one pipe, overlapped F/B pairs.

Device r holds chunk 0 = stage r and chunk 1 = stage 2D-1-r. Its order is the eight steps of DeepSeek's
dualpipev.py, named as there: 1 nF0, 2 nF0F1 (warm-up, forward only); 3 nB1W1F1 (the first backwards, zero
bubble: I then its W); 4 nF0B1F1B0, the main step, whose (F, B) pairs DualPipe overlaps; 5 nB1F1B0 and
6 nB1B0 (cool-down, the second half of step 6 split into I and deferred W); 7 nWB0 (zero bubble: a deferred
W, then a split backward); 8 nW (the deferred W's that remain). Each W step runs the oldest queued W.
"""

from __future__ import annotations

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.build import DeviceOrder, assemble
from bitpipe_fx.schedules.ir import Action, Program, v_placement
from bitpipe_fx.schedules.registry import register


def _step_6(r: int) -> str:
    """nB1B0 for r + 1 rounds, split (I0 / I1) from the middle round on: before its B1 when r is odd."""
    ops = ["B1", "B0"] * (r + 1)
    first_split = 2 * ((r + 1) // 2) + (r % 2 == 0)
    return " ".join(ops[:first_split] + ["I" + op[1] for op in ops[first_split:]])


def _rank_order(devices: int, microbatches: int, r: int) -> list[Action]:
    """DeepSeek's eight steps for rank r."""
    dev = DeviceOrder((r, 2 * devices - 1 - r), microbatches)
    rest = devices - r - 1
    dev.run(2 * rest, "F0")  # step 1: nF0
    dev.run(r + 1, "F0 F1")  # step 2: nF0F1
    dev.run(rest, "I1 W F1")  # step 3: nB1W1F1, zero bubble
    dev.run(microbatches - 2 * devices + r + 1, "F0 B1 F1 B0")  # step 4: nF0B1F1B0, overlapped pairs
    dev.run(rest, "B1 F1 B0")  # step 5: nB1F1B0
    dev.run(1, _step_6(r))  # step 6: nB1B0, second half zero bubble
    dev.run(rest, "W I0")  # step 7: nWB0, zero bubble
    dev.run(r + 1, "W")  # step 8: nW
    return dev.actions


@register("dualpipev")
def dualpipev(devices: int, microbatches: int) -> Program:
    """DeepSeek's DualPipeV order; needs N >= 2D."""
    if microbatches < 2 * devices:
        raise ScheduleError(
            f"dualpipev needs microbatches >= 2*devices = {2 * devices}, got microbatches={microbatches}; "
            f"use at least {2 * devices} micro-batches or fewer devices"
        )
    per_device = [_rank_order(devices, microbatches, r) for r in range(devices)]
    return assemble("dualpipev", v_placement(devices), [0] * microbatches, per_device)
