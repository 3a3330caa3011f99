"""The one dependency rule of the schedule IR: what an action needs before it may start, and what it provides.

A result is named by a key ``(kind, pipe, stage, micro-batch)``:

- ``("F", p, s, m)``: the output (activation) of F(p, s, m);
- ``("B/I", p, s, m)``: the input gradient of stage s, from B or I(p, s, m);
- ``("W", p, s, m)``: the weight gradient of stage s, from B or W(p, s, m) (nothing waits for it; it marks
  the work as done).

F of stage s needs the activation of stage s-1; B or I of stage s needs its own forward and the input
gradient of stage s+1; W needs the input gradient of its own stage (it runs after I). SYNC needs nothing
here: it follows its chunk's backwards in program order. Whether a need crosses devices is the placement's
business (``comm``), not this rule's.
"""

from __future__ import annotations

from bitpipe_fx.schedules.ir import Action

Key = tuple[str, int, int, int]
ACTIVATION, INPUT_GRAD, WEIGHT_GRAD = "F", "B/I", "W"


def needs(action: Action, stages: int) -> tuple[Key, ...]:
    """The results that must exist before ``action`` may start, in a program of ``stages`` stages."""
    kind, p, s, m = action.kind, action.pipe, action.stage, action.microbatch
    if kind == "F":
        return ((ACTIVATION, p, s - 1, m),) if s > 0 else ()
    if kind in ("B", "I"):
        return ((ACTIVATION, p, s, m),) + (((INPUT_GRAD, p, s + 1, m),) if s + 1 < stages else ())
    if kind == "W":
        return ((INPUT_GRAD, p, s, m),)
    return ()


def provides(action: Action) -> tuple[Key, ...]:
    """The results ``action`` makes when it ends."""
    kind, p, s, m = action.kind, action.pipe, action.stage, action.microbatch
    if kind == "F":
        return ((ACTIVATION, p, s, m),)
    if kind == "B":
        return ((INPUT_GRAD, p, s, m), (WEIGHT_GRAD, p, s, m))
    if kind == "I":
        return ((INPUT_GRAD, p, s, m),)
    if kind == "W":
        return ((WEIGHT_GRAD, p, s, m),)
    return ()


def handoff_stage(key: Key, stages: int) -> int | None:
    """The other stage that needs ``key`` (the next for an activation, the previous for an input gradient), or None."""
    kind, _, s, _ = key
    if kind == ACTIVATION:
        return s + 1 if s + 1 < stages else None
    if kind == INPUT_GRAD:
        return s - 1 if s > 0 else None
    return None


def dependents(key: Key, stages: int, split: bool) -> tuple[Action, ...]:
    """The inverse of ``needs``: the actions that need ``key`` (backwards are I and W when ``split``, else B)."""
    kind, p, s, m = key
    backward = "I" if split else "B"
    other = handoff_stage(key, stages)
    if kind == ACTIVATION:
        return ((Action("F", p, other, m),) if other is not None else ()) + (Action(backward, p, s, m),)
    if kind == INPUT_GRAD:
        return ((Action(backward, p, other, m),) if other is not None else ()) + (
            (Action("W", p, s, m),) if split else ()
        )
    return ()


def describe(key: Key) -> str:
    """Text of a key for error messages: ``F0.3.5``, ``B/I0.3.5`` or ``B/W0.3.5``."""
    kind, p, s, m = key
    return f"{'B/W' if kind == WEIGHT_GRAD else kind}{p}.{s}.{m}"
