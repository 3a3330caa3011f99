"""Derive point-to-point communication from a program and its placement.

This is the one function pair that both the simulator and the runtime use, so what is
simulated is what runs. The values are the dependency rule's (``deps``) needs that cross
chunks; a value crosses devices only when producer and consumer chunks sit on different
devices; a V turn (stage D-1 -> D on one device) is a local hand-off.

- activation of (pipe, stage, mb): produced by F(pipe, stage, mb), consumed by F(pipe, stage+1, mb)
- gradient of (pipe, stage, mb): produced by B or I(pipe, stage, mb), consumed by
  B or I(pipe, stage-1, mb)
"""

from __future__ import annotations

from dataclasses import dataclass

from bitpipe_fx.schedules.deps import ACTIVATION, INPUT_GRAD, Key, handoff_stage, needs, provides
from bitpipe_fx.schedules.ir import Action, Program

_MESSAGE_KIND = {ACTIVATION: "act", INPUT_GRAD: "grad"}  # result kind -> message kind


@dataclass(frozen=True, order=True)
class Message:
    """One tensor bundle sent from ``src`` to ``dst``.

    ``kind`` is "act" (forward output of ``stage``) or "grad" (input gradient of ``stage``).
    """

    kind: str
    pipe: int
    stage: int
    microbatch: int
    src: int
    dst: int

    def __str__(self) -> str:
        return f"{self.kind}{self.pipe}.{self.stage}.{self.microbatch}:{self.src}->{self.dst}"


@dataclass(frozen=True)
class Comm:
    """A SEND or RECV of one message, as it appears in a lowered device program."""

    op: str  # "SEND" | "RECV"
    message: Message

    def __str__(self) -> str:
        return f"{self.op}({self.message})"


Op = Action | Comm


Handoff = tuple[Key, int, int]  # (result, source device, destination device) of a value between two chunks


# one action, prepared once per program: (action, its needs, its results, the need another chunk produces
# (src == dst for a local hand-off), the result another chunk needs); a plain tuple, read by unpacking
Wired = tuple[Action, tuple[Key, ...], tuple[Key, ...], Handoff | None, Handoff | None]
_WIRED: dict[int, tuple[Program, tuple[tuple[Wired, ...], ...]]] = {}  # id(program) -> (program, wiring)
_WIRED_KEPT = 8


def handoffs(program: Program) -> tuple[tuple[Wired, ...], ...]:
    """Per device, per action: its Wired record. Derived once per program object and shared by validate() and
    simulate(); remembered by identity, because hashing a large program costs more than deriving it."""
    hit = _WIRED.get(id(program))
    if hit is not None and hit[0] is program:
        return hit[1]
    table, stages = program.placement.table, program.stages
    wiring = []
    for acts in program.device_actions:
        row = []
        for a in acts:
            need, made = needs(a, stages), provides(a)
            row.append((a, need, made, _inbound(table, a, need), _outbound(table, stages, made)))
        wiring.append(tuple(row))
    if len(_WIRED) >= _WIRED_KEPT:
        del _WIRED[next(iter(_WIRED))]
    _WIRED[id(program)] = (program, tuple(wiring))
    return _WIRED[id(program)][1]


def message_of(handoff: Handoff) -> Message:
    """The message that carries ``handoff``."""
    (kind, pipe, stage, mb), src, dst = handoff
    return Message(_MESSAGE_KIND[kind], pipe, stage, mb, src, dst)


def produced_value(program: Program, action: Action) -> Message | None:
    """The value ``action`` hands to another chunk (src == dst for a local hand-off), or None."""
    handoff = _outbound(program.placement.table, program.stages, provides(action))
    return None if handoff is None else message_of(handoff)


def consumed_value(program: Program, action: Action) -> Message | None:
    """The value ``action`` needs from another chunk (src == dst for a local hand-off), or None."""
    handoff = _inbound(program.placement.table, action, needs(action, program.stages))
    return None if handoff is None else message_of(handoff)


def _inbound(table: tuple[tuple[int, ...], ...], action: Action, need: tuple[Key, ...]) -> Handoff | None:
    """The need of ``action`` (``need`` = its needs) that another chunk (another stage of its pipe) produces."""
    for key in need:
        if key[2] != action.stage:
            row = table[key[1]]
            return key, row[key[2]], row[action.stage]
    return None


def _outbound(table: tuple[tuple[int, ...], ...], stages: int, made: tuple[Key, ...]) -> Handoff | None:
    """The result (of ``made``, an action's results) that another chunk needs."""
    for key in made:
        if (dst := handoff_stage(key, stages)) is not None:
            row = table[key[1]]
            return key, row[key[2]], row[dst]
    return None


def produced_message(program: Program, action: Action) -> Message | None:
    """The cross-device message ``action`` produces, or None (last stage, first stage, local hand-off)."""
    value = produced_value(program, action)
    return value if value is not None and value.src != value.dst else None


def consumed_message(program: Program, action: Action) -> Message | None:
    """The cross-device message ``action`` must receive before it runs, or None."""
    value = consumed_value(program, action)
    return value if value is not None and value.src != value.dst else None


def lower(program: Program) -> tuple[tuple[Op, ...], ...]:
    """Per-device op lists: each RECV right before its consumer, each SEND right after its producer.

    The runtime may post receives earlier (it does); the order of sends per device is this one.
    """
    out = []
    for row in handoffs(program):
        ops: list[Op] = []
        for a, _, _, inbound, outbound in row:
            if inbound is not None and inbound[1] != inbound[2]:
                ops.append(Comm("RECV", message_of(inbound)))
            ops.append(a)
            if outbound is not None and outbound[1] != outbound[2]:
                ops.append(Comm("SEND", message_of(outbound)))
        out.append(tuple(ops))
    return tuple(out)


def messages(program: Program) -> tuple[Message, ...]:
    """Every cross-device message of the program, in per-device send order, device-major."""
    return tuple(op.message for ops in lower(program) for op in ops if isinstance(op, Comm) and op.op == "SEND")
