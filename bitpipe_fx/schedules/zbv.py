"""ZB-V (Qi et al., "Zero Bubble Pipeline Parallelism", 2024): V placement, backward split into I and W.

Device d holds chunk 0 = stage d and chunk 1 = stage 2D-1-d. Its order has the paper's phases: 2(D-d)-1
chunk-0 forwards; d pairs (F1, F0); D-d triples (F1, I1, W1); the steady state (F0, I0, W0, F1, I1, W1)
until every forward ran; a cool-down of d pairs (I0, I1) and D-d pairs (I0, W0); then the deferred W's.
Actions past the last micro-batch are skipped, so any N works.
"""

from __future__ import annotations

from bitpipe_fx.schedules.build import assemble
from bitpipe_fx.schedules.ir import Action, Program, v_placement
from bitpipe_fx.schedules.registry import register


@register("zbv")
def zbv(devices: int, microbatches: int) -> Program:
    """The ZB-V order for D devices and N micro-batches."""
    per_device = []
    for d in range(devices):
        stage_of = {0: d, 1: 2 * devices - 1 - d}
        count = {(k, c): 0 for k in "FIW" for c in (0, 1)}
        acts: list[Action] = []

        def run(kind: str, chunk: int, acts=acts, count=count, stage_of=stage_of) -> None:
            mb = count[kind, chunk]
            if mb < microbatches:
                acts.append(Action(kind, 0, stage_of[chunk], mb))
                count[kind, chunk] += 1

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
        per_device.append(acts)
    return assemble("zbv", v_placement(devices), [0] * microbatches, per_device)
