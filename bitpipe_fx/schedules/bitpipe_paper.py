"""BitPipe as published (Wu et al., "BitPipe: Bidirectional Interleaved Pipeline Parallelism for Accelerating
Large Models Training"): two V-shaped pipes in opposite directions, four chunks per device.

The order is the authors' (their Megatron-LM fork, megatron/core/pipeline_parallel/bitpipe_schedule.py),
rewritten here as its phases. Each pipe's micro-batch runs an outbound leg (the V's first half: down
0 -> D-1, up D-1 -> 0), turns on one device, and runs a return leg. Micro-batches come in units of D, D/2 per
pipe. A device's own pipe is the one that enters on its half (down for d < D/2); it starts
a = D/2 - min(d, D-1-d) of its own micro-batches before the other pipe's first one arrives (D/2 at the
edges, 1 in the middle). Per unit, the forwards go in five phases (see ``unit``); the backwards retrace them
with the legs swapped. The step: a warm-up of 2D - a forwards; per unit, a steady (F, B) pairs; between
units, the unit's cool-down (2D - 2a + 1 backwards), a - 1 pairs, and the next unit's warm-up (2D - 2a + 1
forwards); after the last unit, the remaining backwards. Eager syncs: the return legs' pair just before
the device's last backward (after it on the two middle devices, a = 1), the outbound legs' pair at the end.
For D = 4, N = 4 this is DESIGN.md's listing op for op.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain, islice

from bitpipe_fx.schedules.build import require_even_devices, require_multiple_of_devices
from bitpipe_fx.schedules.ir import Action, Program, bitpipe_placement
from bitpipe_fx.schedules.registry import register

OUT, BACK = 0, 1  # the legs of a V: outbound (first half of the stages), return (second half)


def check_bitpipe(name: str, devices: int, microbatches: int) -> None:
    """BitPipe needs an even D (replicas on d and D-1-d) and N a multiple of D (D/2 per pipe per unit)."""
    require_even_devices(name, devices)
    require_multiple_of_devices(name, devices, microbatches)


def bitpipe_pipe_of(devices: int, microbatches: int) -> tuple[int, ...]:
    """Micro-batch m travels down (pipe 0) when m mod D < D/2, else up (pipe 1)."""
    return tuple(0 if m % devices < devices // 2 else 1 for m in range(microbatches))


def stages_of(devices: int, d: int) -> dict[tuple[int, int], int]:
    """(pipe, leg) -> the stage device d holds: down d and 2D-1-d, up D-1-d and D+d."""
    return {(0, OUT): d, (0, BACK): 2 * devices - 1 - d, (1, OUT): devices - 1 - d, (1, BACK): devices + d}


def head_start(devices: int, d: int) -> int:
    """a: how many of its own pipe's micro-batches device d runs before the other pipe's first arrives."""
    return devices // 2 - min(d, devices - 1 - d)


def unit(kind: str, devices: int, d: int, j: int) -> list[Action]:
    """Unit j's forwards (kind F) or backwards (kind B, legs swapped) on device d, in the five phases."""
    half, a, stage = devices // 2, head_start(devices, d), stages_of(devices, d)
    own = 0 if d < half else 1
    other = 1 - own
    first, second = (OUT, BACK) if kind == "F" else (BACK, OUT)

    def op(pipe: int, leg: int, q: int) -> Action:
        return Action(kind, pipe, stage[pipe, leg], j * devices + pipe * half + q)

    def pairs(n: int, x: tuple[int, int, int], y: tuple[int, int, int]) -> list[Action]:
        """n alternations of x and y, each given as (pipe, leg, slot of its first micro-batch in the unit)."""
        return [act for q in range(n) for act in (op(x[0], x[1], x[2] + q), op(y[0], y[1], y[2] + q))]

    return [
        *(op(own, first, q) for q in range(a)),  # own pipe alone
        *pairs(half - a, (other, first, 0), (own, first, a)),  # the other pipe arrives
        *pairs(a, (other, first, half - a), (other, second, 0)),  # the other pipe turns
        *pairs(half - a, (own, second, 0), (other, second, a)),  # own pipe turns
        *(op(own, second, half - a + q) for q in range(a)),  # own pipe alone again
    ]


def device_order(devices: int, microbatches: int, d: int) -> list[Action]:
    """Device d's forwards and backwards: warm-up, per unit steady pairs, cool-down / warm-up, cool-down."""
    units, a = microbatches // devices, head_start(devices, d)
    fwd: Iterator[Action] = chain.from_iterable(unit("F", devices, d, j) for j in range(units))
    bwd: Iterator[Action] = chain.from_iterable(unit("B", devices, d, j) for j in range(units))

    def take(it: Iterator[Action], n: int) -> list[Action]:
        return list(islice(it, n))

    def one_f_one_b(n: int) -> list[Action]:
        return [act for _ in range(n) for act in (*take(fwd, 1), *take(bwd, 1))]

    order = take(fwd, 2 * devices - a)  # warm-up
    for j in range(units):
        order += one_f_one_b(a)  # steady state
        if j < units - 1:
            order += take(bwd, 2 * devices - 2 * a + 1)  # cool-down of unit j ...
            order += one_f_one_b(a - 1)
            order += take(fwd, 2 * devices - 2 * a + 1)  # ... and warm-up of unit j + 1
    return order + list(bwd)  # cool-down


def with_paper_syncs(devices: int, d: int, actions: Sequence[Action]) -> tuple[Action, ...]:
    """The return legs' SYNC pair before the last backward (after it when a = 1), the outbound pair last."""
    stage = stages_of(devices, d)
    back, out = ([Action("SYNC", p, stage[p, leg]) for p in (0, 1)] for leg in (BACK, OUT))
    cut = len(actions) - (head_start(devices, d) > 1)
    return (*actions[:cut], *back, *actions[cut:], *out)


def paper_order(devices: int, microbatches: int) -> tuple[tuple[Action, ...], ...]:
    """The published per-device compute order, without syncs."""
    return tuple(tuple(device_order(devices, microbatches, d)) for d in range(devices))


@register("bitpipe-paper")
def bitpipe_paper(devices: int, microbatches: int) -> Program:
    """The published BitPipe order (even D, N a multiple of D)."""
    check_bitpipe("bitpipe-paper", devices, microbatches)
    return Program(
        "bitpipe-paper",
        bitpipe_placement(devices),
        bitpipe_pipe_of(devices, microbatches),
        tuple(with_paper_syncs(devices, d, acts) for d, acts in enumerate(paper_order(devices, microbatches))),
    )
