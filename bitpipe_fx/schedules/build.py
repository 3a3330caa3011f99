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


class DeviceOrder:
    """One device's action list, written the way the papers write their steps: ``run(n, "F1 I1 W1")``.

    An op is a kind and a chunk of this device (``F0``, ``B1``, ``I0``, ``W1``) and runs that chunk's next
    micro-batch; B and I count as the same backward, I queues its W, ``W1`` runs chunk 1's oldest queued W
    and a bare ``W`` the oldest queued one. Ops past the last micro-batch (or with no W queued) are skipped.
    """

    def __init__(self, stages: Sequence[int], microbatches: int) -> None:
        self.stages, self.microbatches = tuple(stages), microbatches
        self.actions: list[Action] = []
        self._next = {(kind, c): 0 for kind in "FB" for c in range(len(self.stages))}
        self._deferred: list[Action] = []

    def count(self, kind: str, chunk: int) -> int:
        """How many forwards (``F``) or backwards (``B``: B or I) of ``chunk`` have run."""
        return self._next[kind, chunk]

    def deferred(self, chunk: int) -> int:
        """How many W's of ``chunk`` are queued."""
        return sum(1 for w in self._deferred if w.stage == self.stages[chunk])

    def run(self, times: int, ops: str) -> None:
        """Run the ops of ``ops`` (space separated) in order, ``times`` times."""
        for _ in range(times):
            for op in ops.split():
                self._op(op[0], int(op[1:]) if op[1:] else None)

    def _op(self, kind: str, chunk: int | None) -> None:
        if kind == "W":
            queued = [w for w in self._deferred if chunk is None or w.stage == self.stages[chunk]]
            if queued:
                self._deferred.remove(queued[0])
                self.actions.append(queued[0])
            return
        if chunk is None or kind not in "FBI":
            raise ScheduleError(f"unknown op {kind}{'' if chunk is None else chunk}; write F0, B1, I0, W1 or W")
        counter = ("F" if kind == "F" else "B", chunk)
        mb = self._next[counter]
        if mb >= self.microbatches:
            return
        self._next[counter] += 1
        self.actions.append(Action(kind, 0, self.stages[chunk], mb))
        if kind == "I":
            self._deferred.append(Action("W", 0, self.stages[chunk], mb))
