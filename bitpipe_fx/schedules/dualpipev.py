"""DualPipeV (DeepSeek, the "cut-in-half" DualPipe): V placement, one pipe, overlapped F/B pairs.

Device r holds chunk 0 = stage r and chunk 1 = stage 2D-1-r. DeepSeek's eight steps: 2(D-r-1) F0;
r+1 (F0, F1); D-r-1 (I1, W, F1); N-2D+r+1 rounds of (F0, B1, F1, B0) — the pairs DualPipe overlaps;
D-r-1 (B1, F1, B0); r+1 (B1, B0) switching to split backwards halfway; D-r-1 (W, I0); r+1 W. A split
backward queues its W and each W step runs the oldest queued one.
"""

from __future__ import annotations

from collections import deque

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.build import assemble
from bitpipe_fx.schedules.ir import Action, Program, v_placement
from bitpipe_fx.schedules.registry import register


def _rank_order(devices: int, microbatches: int, r: int) -> list[Action]:
    stage = (r, 2 * devices - 1 - r)
    count = {"F": [0, 0], "B": [0, 0]}
    queued: deque[Action] = deque()
    acts: list[Action] = []

    def f(c: int) -> None:
        acts.append(Action("F", 0, stage[c], count["F"][c]))
        count["F"][c] += 1

    def b(c: int, split: bool = False) -> None:
        mb = count["B"][c]
        count["B"][c] += 1
        acts.append(Action("I" if split else "B", 0, stage[c], mb))
        if split:
            queued.append(Action("W", 0, stage[c], mb))

    def w() -> None:
        acts.append(queued.popleft())

    rest = devices - r - 1
    for _ in range(2 * rest):
        f(0)
    for _ in range(r + 1):
        f(0)
        f(1)
    for _ in range(rest):
        b(1, split=True)
        w()
        f(1)
    for _ in range(microbatches - 2 * devices + r + 1):
        f(0)
        b(1)
        f(1)
        b(0)
    for _ in range(rest):
        b(1)
        f(1)
        b(0)
    split = False
    for i in range(r + 1):
        if i == (r + 1) // 2 and r % 2 == 1:
            split = True
        b(1, split)
        if i == (r + 1) // 2 and r % 2 == 0:
            split = True
        b(0, split)
    for _ in range(rest):
        w()
        b(0, split=True)
    while queued:
        w()
    return acts


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
