"""Helpers every generator shares: eager SYNC insertion and program assembly."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.ir import Action, Placement, Program

BACKWARD_KINDS = ("B", "W")  # the kinds that finish a chunk's gradient (W when backward is split)


def with_eager_syncs(placement: Placement, device: int, actions: Iterable[Action]) -> tuple[Action, ...]:
    """Insert one SYNC per chunk of ``device`` right after that chunk's last backward (B, or W when split).

    Chunks that never run a backward on this device get their SYNC at the end of the list.
    """
    acts = list(actions)
    last: dict[tuple[int, int], int] = {}
    for i, a in enumerate(acts):
        if a.kind in BACKWARD_KINDS:
            last[a.chunk] = i
    after: dict[int, list[Action]] = {}
    for chunk in placement.chunks(device):
        after.setdefault(last.get(chunk, len(acts) - 1), []).append(Action("SYNC", *chunk))
    out: list[Action] = []
    if not acts:
        out.extend(after.get(-1, []))
    for i, a in enumerate(acts):
        out.append(a)
        out.extend(after.get(i, []))
    return tuple(out)


def assemble(
    name: str, placement: Placement, pipe_of: Sequence[int], per_device: Sequence[Iterable[Action]]
) -> Program:
    """A Program from per-device compute lists, with eager SYNCs added."""
    return Program(
        name,
        placement,
        tuple(pipe_of),
        tuple(with_eager_syncs(placement, d, acts) for d, acts in enumerate(per_device)),
    )


def require_even_devices(name: str, devices: int) -> None:
    """Bidirectional schedules pair device d with D-1-d, so D must be even."""
    if devices % 2:
        raise ScheduleError(
            f"{name} needs an even number of devices, got devices={devices}; use {max(2, devices - 1)} or "
            f"{devices + 1}"
        )


def require_multiple_of_devices(name: str, devices: int, microbatches: int) -> None:
    """Schedules that admit micro-batches in rounds of D need N to be a multiple of D."""
    if microbatches % devices:
        lower = microbatches // devices * devices
        options = [n for n in (lower, lower + devices) if n > 0]
        raise ScheduleError(
            f"{name} needs microbatches to be a multiple of devices={devices}, got microbatches={microbatches}; "
            f"use {' or '.join(map(str, options))}"
        )
