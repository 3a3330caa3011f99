"""GPipe (Huang et al. 2019): all forwards, then all backwards; stage k on device k."""

from __future__ import annotations

from bitpipe_fx.schedules.build import assemble
from bitpipe_fx.schedules.ir import Action, Program, linear_placement
from bitpipe_fx.schedules.registry import register


@register("gpipe")
def gpipe(devices: int, microbatches: int) -> Program:
    """Device d runs F(d, m) for every m, then B(d, m) for every m."""
    per_device = [
        [Action("F", 0, d, m) for m in range(microbatches)] + [Action("B", 0, d, m) for m in range(microbatches)]
        for d in range(devices)
    ]
    return assemble("gpipe", linear_placement(devices), [0] * microbatches, per_device)
