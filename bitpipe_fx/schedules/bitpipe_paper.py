"""BitPipe as published (Wu et al., "BitPipe: Bidirectional Interleaved Pipeline Parallelism for Accelerating
Large Models Training"): two V-shaped pipes in opposite directions, four chunks per device.

The order is the paper's list policy, replayed with unit costs (F = B): a free device runs the ready action of
the deepest stage first (work closest to the loss, then back towards the input), earliest-ready next, and a
backward before a forward. D micro-batches are in flight: micro-batch m enters the pipe only once micro-batch
m - D (same pipe, same slot) has finished its last backward. The gradient syncs go in pairs, one pair per
half (second-half chunks of both pipes, then first-half chunks), each issued in the first bubble after the
pair's last backward on that device, or at the end. For D = 4,
N = 4 this is DESIGN.md's listing op for op.
"""

from __future__ import annotations

from collections.abc import Sequence

from bitpipe_fx.schedules.build import require_even_devices, require_multiple_of_devices
from bitpipe_fx.schedules.ir import Action, Program, bitpipe_placement
from bitpipe_fx.schedules.listsched import Admit, State, Timed, UnitCosts, list_schedule
from bitpipe_fx.schedules.registry import register


def check_bitpipe(name: str, devices: int, microbatches: int) -> None:
    """BitPipe needs an even D (replicas on d and D-1-d) and N a multiple of D (D/2 per pipe per unit)."""
    require_even_devices(name, devices)
    require_multiple_of_devices(name, devices, microbatches)


def bitpipe_pipe_of(devices: int, microbatches: int) -> tuple[int, ...]:
    """Micro-batch m travels down (pipe 0) when m mod D < D/2, else up (pipe 1)."""
    return tuple(0 if m % devices < devices // 2 else 1 for m in range(microbatches))


def after_slot_frees(lag: int) -> Admit:
    """Micro-batch m may enter stage 0 once micro-batch m - lag has finished its input gradient there."""

    def admit(a: Action, state: State) -> bool:
        if a.kind != "F" or a.stage != 0 or a.microbatch < lag:
            return True
        return state.finished(("B/I", a.pipe, 0, a.microbatch - lag))

    return admit


def deepest_first(a: Action, ready: float) -> tuple:
    """The paper's priority: deepest stage, then earliest ready, then backward before forward."""
    return (-a.stage, ready, a.kind != "B", a.microbatch)


def paper_order(devices: int, microbatches: int) -> tuple[tuple[Timed, ...], ...]:
    """The published per-device order, with its unit-cost timing."""
    return list_schedule(
        bitpipe_placement(devices),
        bitpipe_pipe_of(devices, microbatches),
        deepest_first,
        UnitCosts(forward=1.0, backward=1.0),
        admit=after_slot_frees(devices),
    )


def syncs_in_bubbles(devices: int, device: int, timed: Sequence[Timed]) -> tuple[Action, ...]:
    """Issue each half's pair of SYNCs (second halves, then first halves) in the first wait after the pair's
    last backward on this device, or at the end."""
    d = device
    halves = (((0, 2 * devices - 1 - d), (1, devices + d)), ((0, d), (1, devices - 1 - d)))
    waits = [i for i in range(1, len(timed)) if timed[i].start > timed[i - 1].end] + [len(timed)]
    at: dict[int, list[Action]] = {}
    for pair in halves:
        last = max((i for i, t in enumerate(timed) if t.action.chunk in pair and t.action.kind == "B"), default=-1)
        at.setdefault(next(i for i in waits if i > last), []).extend(Action("SYNC", *c) for c in pair)
    out: list[Action] = []
    for i, t in enumerate(timed):
        out.extend(at.get(i, []))
        out.append(t.action)
    out.extend(at.get(len(timed), []))
    return tuple(out)


@register("bitpipe-paper")
def bitpipe_paper(devices: int, microbatches: int) -> Program:
    """The published BitPipe order (even D, N a multiple of D)."""
    check_bitpipe("bitpipe-paper", devices, microbatches)
    timed = paper_order(devices, microbatches)
    return Program(
        "bitpipe-paper",
        bitpipe_placement(devices),
        bitpipe_pipe_of(devices, microbatches),
        tuple(syncs_in_bubbles(devices, d, t) for d, t in enumerate(timed)),
    )
