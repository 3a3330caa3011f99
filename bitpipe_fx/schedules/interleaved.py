"""Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM): v chunks per device, stage k on device k mod D.

Megatron's order: virtual micro-batch k runs chunk (k // D) mod v forwards and chunk v-1-((k // D) mod v)
backwards, for micro-batch (k // vD)·D + k mod D; device d warms up with 2(D-1-d) + (v-1)·D forwards
(all of them when N = D), then alternates one forward and one backward, then drains the backwards.
"""

from __future__ import annotations

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.build import assemble, require_multiple_of_devices
from bitpipe_fx.schedules.ir import Action, Program, linear_placement
from bitpipe_fx.schedules.registry import register


@register("interleaved")
def interleaved(devices: int, microbatches: int, chunks: int = 2) -> Program:
    """Megatron's interleaved 1F1B with ``chunks`` (v) model chunks per device; N must be a multiple of D."""
    if not isinstance(chunks, int) or chunks < 2:
        raise ScheduleError(f"interleaved needs chunks >= 2, got chunks={chunks!r}; use '1f1b' for one chunk")
    require_multiple_of_devices("interleaved (Megatron's order)", devices, microbatches)
    total = microbatches * chunks

    def virtual(kind: str, k: int, d: int) -> Action:
        chunk = (k // devices) % chunks
        if kind == "B":
            chunk = chunks - 1 - chunk
        mb = (k // (devices * chunks)) * devices + k % devices
        return Action(kind, 0, chunk * devices + d, mb)

    per_device = []
    for d in range(devices):
        warmup = total if microbatches == devices else min(2 * (devices - 1 - d) + (chunks - 1) * devices, total)
        acts = [virtual("F", k, d) for k in range(warmup)]
        for i in range(total - warmup):
            acts += [virtual("F", warmup + i, d), virtual("B", i, d)]
        acts += [virtual("B", k, d) for k in range(total - warmup, total)]
        per_device.append(acts)
    return assemble("interleaved", linear_placement(devices, chunks), [0] * microbatches, per_device)
