"""Name -> generator registry. A generator is a pure function (devices, microbatches, **options) -> Program.

The registry also knows each generator's options (its keyword parameters after ``devices`` and
``microbatches``, with the types their annotations name), so an unknown schedule, an unknown option or a
value of the wrong type is one ScheduleError listing what is valid, wherever the schedule was named.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules.ir import Program

Generator = Callable[..., Program]
SCHEDULES: dict[str, Generator] = {}
ANY = object  # the accepted type of an option whose generator gives no usable annotation or default


def register(name: str) -> Callable[[Generator], Generator]:
    """Decorator: make a generator available to ``generate(name, ...)``."""

    def deco(fn: Generator) -> Generator:
        if name in SCHEDULES:
            raise ScheduleError(f"schedule {name!r} is registered twice")
        SCHEDULES[name] = fn
        return fn

    return deco


def _flatten(hint: object) -> tuple[type, ...]:
    """``int | None`` -> (int, NoneType); ``tuple[float, ...]`` -> (tuple,)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for arg in typing.get_args(hint) for t in _flatten(arg))
    if hint is None:
        return (type(None),)
    origin = typing.get_origin(hint)
    if isinstance(origin, type):
        return (origin,)
    return (hint,) if isinstance(hint, type) else (ANY,)


COSTS = "costs"  # the plan's CostModel: passed by the planner (generate(costs=)), never a user option


def takes_costs(name: str) -> bool:
    """Whether schedule ``name``'s generator orders with a CostModel (``costs=``)."""
    return COSTS in inspect.signature(SCHEDULES[require_schedule(name)]).parameters


def option_types(name: str) -> dict[str, tuple[type, ...]]:
    """The options schedule ``name`` accepts, each with its accepted types; ``{"**": (object,)}`` when it
    takes any keyword. ``costs`` is not among them: only the planner passes it."""
    fn = SCHEDULES[require_schedule(name)]
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation that names something not importable here
        hints = {}
    out: dict[str, tuple[type, ...]] = {}
    for param in list(inspect.signature(fn).parameters.values())[2:]:
        if param.name == COSTS:
            continue
        if param.kind is param.VAR_KEYWORD:
            out["**"] = (ANY,)
        elif param.kind is not param.VAR_POSITIONAL:
            default = () if param.default is param.empty or param.default is None else (type(param.default),)
            out[param.name] = _flatten(hints[param.name]) if param.name in hints else default or (ANY,)
    return out


def require_schedule(name: object) -> str:
    """``name`` if it names a registered schedule, else a ScheduleError listing them."""
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(sorted(SCHEDULES))}")
    return name


def type_names(accepted: tuple[type, ...]) -> str:
    """(int, NoneType) -> "int or None"."""
    return " or ".join("None" if t is type(None) else "any value" if t is ANY else t.__name__ for t in accepted)


def accepts(accepted: tuple[type, ...], value: object) -> bool:
    """Whether ``value`` is one of the accepted types (an int passes for a float; a bool only for a bool)."""
    if ANY in accepted:
        return True
    if isinstance(value, bool):
        return bool in accepted
    if isinstance(value, int) and float in accepted:
        return True
    if isinstance(value, list) and tuple in accepted:
        return True
    return isinstance(value, accepted)


def check_options(name: str, options: Mapping[str, object]) -> None:
    """Refuse an unknown schedule, an option it does not take, or a value of the wrong type."""
    known = option_types(name)
    listed = ", ".join(f"{k} ({type_names(v)})" for k, v in known.items() if k != "**")
    for key, value in options.items():
        if key not in known and "**" not in known:
            valid = f"its options are {listed}" if listed else "it takes no options"
            raise ScheduleError(f"schedule {name!r} has no option {key!r}; {valid}")
        accepted = known.get(key, (ANY,))
        if not accepts(accepted, value):
            raise ScheduleError(
                f"option {key} of schedule {name!r} takes {type_names(accepted)}, got {value!r}"
            )


def generate(name: str, devices: int, microbatches: int, costs: object = None, **options) -> Program:
    """Build the program of schedule ``name`` for D devices and N micro-batches (ordered under ``costs``, the
    plan's CostModel, when its generator takes one)."""
    check_options(name, options)
    if not isinstance(devices, int) or devices < 1:
        raise ScheduleError(f"devices must be a positive integer, got {devices!r}")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ScheduleError(f"microbatches must be a positive integer, got {microbatches!r}")
    if costs is not None and takes_costs(name):
        options = {**options, COSTS: costs}
    return SCHEDULES[name](devices, microbatches, **options)
