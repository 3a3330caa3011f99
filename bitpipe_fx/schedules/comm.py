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

from bitpipe_fx.schedules.deps import ACTIVATION, INPUT_GRAD, Key, dependents, needs, provides
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


def produced_value(program: Program, action: Action) -> Message | None:
    """The value ``action`` hands to another chunk (src == dst for a local hand-off), or None."""
    for key in provides(action):
        for consumer in dependents(key, program.stages, split=False):
            if consumer.stage != action.stage:
                return _value(program, key, consumer.stage)
    return None


def consumed_value(program: Program, action: Action) -> Message | None:
    """The value ``action`` needs from another chunk (src == dst for a local hand-off), or None."""
    for key in needs(action, program.stages):
        if key[2] != action.stage:
            return _value(program, key, action.stage)
    return None


def _value(program: Program, key: Key, dst_stage: int) -> Message:
    """The message carrying result ``key`` to the chunk of ``dst_stage`` on the same pipe."""
    kind, pipe, stage, mb = key
    place = program.placement
    return Message(_MESSAGE_KIND[kind], pipe, stage, mb, place.device(pipe, stage), place.device(pipe, dst_stage))


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
    for acts in program.device_actions:
        ops: list[Op] = []
        for a in acts:
            if (m := consumed_message(program, a)) is not None:
                ops.append(Comm("RECV", m))
            ops.append(a)
            if (m := produced_message(program, a)) is not None:
                ops.append(Comm("SEND", m))
        out.append(tuple(ops))
    return tuple(out)


def messages(program: Program) -> tuple[Message, ...]:
    """Every cross-device message of the program, in per-device send order, device-major."""
    return tuple(op.message for ops in lower(program) for op in ops if isinstance(op, Comm) and op.op == "SEND")
