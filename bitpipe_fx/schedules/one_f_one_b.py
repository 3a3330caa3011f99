"""1F1B (PipeDream-Flush, Narayanan et al. 2021): warm up, then alternate one forward and one backward."""

from __future__ import annotations

from bitpipe_fx.schedules.build import assemble
from bitpipe_fx.schedules.ir import Action, Program, linear_placement
from bitpipe_fx.schedules.registry import register


@register("1f1b")
def one_f_one_b(devices: int, microbatches: int) -> Program:
    """Device d runs min(D-1-d, N) warm-up forwards, then F/B pairs, then the remaining backwards."""
    per_device = []
    for d in range(devices):
        warmup = min(devices - 1 - d, microbatches)
        acts = [Action("F", 0, d, m) for m in range(warmup)]
        for m in range(microbatches - warmup):
            acts += [Action("F", 0, d, m + warmup), Action("B", 0, d, m)]
        acts += [Action("B", 0, d, m) for m in range(microbatches - warmup, microbatches)]
        per_device.append(acts)
    return assemble("1f1b", linear_placement(devices), [0] * microbatches, per_device)
