"""One schedule spec, ``name[:key=value,...]``, read the same way by compile() and every sub-command.

``interleaved:chunks=2`` names the schedule and its generator options; a value is typed by what the
generator's parameter accepts (int, float, bool as true/false, None as none, else str). An unknown
schedule, an unknown option or a value of the wrong type is a ScheduleError listing the valid ones, with
the same text wherever the spec came from. ``auto[:memory_limit=12GiB]`` is a spec too: not a generator but
the request to search every family (bitpipe_fx.autotune); its one option is the memory limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from bitpipe_fx.errors import ConfigError, ScheduleError
from bitpipe_fx.schedules.registry import ANY, check_options, option_types, require_schedule, type_names

OptionValue = int | float | bool | str | tuple[float, ...] | None
AUTO = "auto"  # the spec that asks compile to search every family instead of naming one
AUTO_OPTIONS = ("memory_limit",)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class ScheduleSpec:
    """A checked schedule name and its generator options, sorted by name."""

    name: str
    options: tuple[tuple[str, OptionValue], ...] = ()

    def kwargs(self) -> dict[str, OptionValue]:
        """The options as keyword arguments of ``generate``."""
        return dict(self.options)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={_text(v)}" for k, v in self.options)
        return f"{self.name}:{opts}" if opts else self.name


def _text(value: OptionValue) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return str(value)


def _typed(name: str, key: str, text: str) -> OptionValue:
    """The value of option ``key`` written as ``text``, typed by what schedule ``name`` accepts."""
    known = option_types(name)
    if key not in known and "**" not in known:
        check_options(name, {key: text})  # raises the unknown-option error, naming the valid ones
    accepted = known.get(key, known.get("**", ()))
    lowered = text.strip().lower()
    if type(None) in accepted and lowered == "none":
        return None
    if bool in accepted and lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        if cast in accepted or ANY in accepted or (cast is int and float in accepted):
            try:
                return cast(text)
            except ValueError:
                pass
    if str in accepted or ANY in accepted:
        return text
    raise ScheduleError(f"option {key} of schedule {name!r} takes {type_names(accepted)}, got {text!r}")


def make_spec(name: str, options: Mapping[str, object] | None = None) -> ScheduleSpec:
    """A ScheduleSpec from a registered name (or ``auto``) and Python option values, checked against the generator."""
    opts = dict(options or {})
    if name == AUTO:
        for key in opts:
            if key not in AUTO_OPTIONS:
                raise ScheduleError(f"schedule 'auto' has no option {key!r}; its options are {', '.join(AUTO_OPTIONS)}")
        return ScheduleSpec(AUTO, tuple(sorted((k, _hashable(v)) for k, v in opts.items())))
    require_schedule(name)
    check_options(name, opts)
    return ScheduleSpec(name, tuple(sorted((k, _hashable(v)) for k, v in opts.items())))


def _hashable(value: object) -> OptionValue:
    return tuple(value) if isinstance(value, list) else value  # type: ignore[return-value]


def parse_spec(text: str) -> ScheduleSpec:
    """``"interleaved:chunks=2"`` -> ScheduleSpec("interleaved", (("chunks", 2),)); options may be separated
    by commas or colons."""
    if not isinstance(text, str):
        raise ScheduleError(f"a schedule is named by a string NAME[:key=value,...], got {text!r}")
    name, _, rest = text.strip().partition(":")
    name = name.strip() if name.strip() == AUTO else require_schedule(name.strip())
    options: dict[str, OptionValue] = {}
    for item in filter(None, (t.strip() for t in rest.replace(":", ",").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ScheduleError(f"cannot read schedule option {item!r} in {text!r}; write NAME:key=value[,key=value]")
        options[key] = value.strip() if name == AUTO else _typed(name, key, value.strip())
    return make_spec(name, options)


def schedule_spec(schedule: str | ScheduleSpec, options: Mapping[str, object] | None = None) -> ScheduleSpec:
    """compile()'s ``schedule`` (a spec string or ScheduleSpec) merged with its keyword options; an option
    given both ways with different values is refused."""
    spec = schedule if isinstance(schedule, ScheduleSpec) else parse_spec(schedule)
    merged = spec.kwargs()
    for key, value in (options or {}).items():
        if key in merged and merged[key] != _hashable(value):
            raise ScheduleError(
                f"schedule option {key} is {merged[key]!r} in {str(spec)!r} but {value!r} as a keyword; give it once"
            )
        merged[key] = value  # type: ignore[assignment]
    return make_spec(spec.name, merged)


def parse_bytes(value: float | int | str | None) -> float | None:
    """A memory size: bytes as a number, or a string such as "12GiB", "1.5e9" or "800MB"; None = no limit."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        try:
            size = float(match.group(1)) * _UNITS[unit] if match else float("nan")
        except (KeyError, ValueError):
            size = float("nan")
    if not size > 0:
        raise ConfigError(f"memory_limit must be a positive size in bytes or a string like '12GiB', got {value!r}")
    return size


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs: ``"gpipe,interleaved:chunks=2,bitpipe"``; an item ``key=value``
    without a colon continues the spec before it (``"interleaved:chunks=2,x=1"`` is one spec)."""
    specs: list[str] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


__all__ = ["AUTO", "OptionValue", "ScheduleSpec", "make_spec", "parse_bytes", "parse_spec", "schedule_spec",
           "split_specs"]
