"""Does a saved plan fit this compile() call? Its schedule, D and N against the arguments given, and the
model it was made for against the model given.

A plan records where it came from (``origin``: the model class, its config, the example micro-batch's
shapes and, from ``bitpipe-fx partition``, the factory and its arguments), so a plan that does not fit a
model's graph is refused with the settings that differ, not only two fingerprints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.schedules.spec import AUTO, ScheduleSpec, parse_bytes, schedule_spec

if TYPE_CHECKING:  # plan.py imports this module
    from bitpipe_fx.plan import Plan

DEFAULT_SCHEDULE, DEFAULT_DEVICES, DEFAULT_MICROBATCHES = "bitpipe", 4, 8
Scalar = int | float | str | bool | None


@dataclasses.dataclass(frozen=True)
class Origin:
    """The model a plan was made for: class, config scalars, example tensors and (from ``bitpipe-fx
    partition``) the factory and its arguments."""

    model: str = ""
    config: tuple[tuple[str, Scalar], ...] = ()
    inputs: tuple[str, ...] = ()
    factory: str = ""
    args: tuple[tuple[str, Scalar], ...] = ()

    def made_by(self, factory: str, args: Mapping[str, object]) -> Origin:
        """This origin with the factory call that built the model (``bitpipe-fx partition``)."""
        return dataclasses.replace(self, factory=factory, args=tuple(sorted(_scalars(args).items())))

    def to_dict(self) -> dict[str, object]:
        return {"model": self.model, "config": dict(self.config), "inputs": list(self.inputs),
                "factory": self.factory, "args": dict(self.args)}

    @classmethod
    def from_dict(cls, data: Mapping[str, object] | None) -> Origin:
        d = dict(data or {})
        return cls(str(d.get("model", "")), tuple(_scalars(d.get("config") or {}).items()),
                   tuple(map(str, d.get("inputs") or ())), str(d.get("factory") or ""),
                   tuple(_scalars(d.get("args") or {}).items()))


def _planned_spec(plan: Plan) -> ScheduleSpec:
    """The plan's schedule as a spec (lists from JSON as tuples, so they compare with given options)."""
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in plan.schedule_options.items()}
    return ScheduleSpec(plan.schedule, tuple(sorted(options.items())))


def compile_settings(
    plan: Plan | None, schedule: str | ScheduleSpec | None, devices: int | None, microbatches: int | None,
    options: Mapping[str, object],
) -> tuple[ScheduleSpec, int, int]:
    """(schedule spec, D, N) of a compile() call: the arguments (or their defaults) without a plan; the
    plan's with one, refusing an argument given with a different value (naming both)."""
    if plan is None:
        spec = schedule_spec(DEFAULT_SCHEDULE if schedule is None else schedule, options)
        return (spec, DEFAULT_DEVICES if devices is None else devices,
                DEFAULT_MICROBATCHES if microbatches is None else microbatches)
    planned = _planned_spec(plan)
    if schedule is not None or options:
        given = schedule_spec(planned.name if schedule is None else schedule, options)
        if given != planned and not _auto_chose(given, plan):
            raise ConfigError(f"schedule {str(given)!r} conflicts with the plan's schedule {str(planned)!r}; "
                              "drop the schedule argument or pass a plan made for it")
    for name, value in (("devices", devices), ("microbatches", microbatches)):
        want = getattr(plan, name)
        if value is not None and value != want:
            raise ConfigError(f"{name}={value!r} conflicts with the plan's {name}={want}; drop {name}= or pass a "
                              f"plan made for {name}={value}")
    return planned, plan.devices, plan.microbatches


def check_cost_options(
    plan: Plan | None, flop_rate: float | None, profile: bool, network: Mapping[str, float] | None
) -> None:
    """Refuse cost options that a given plan contradicts: it was costed and scheduled already."""
    if plan is None:
        return
    if flop_rate is not None and float(flop_rate) != plan.flop_rate:
        raise ConfigError(f"flop_rate={flop_rate:g} conflicts with the plan's flop_rate={plan.flop_rate:g}; drop "
                          "flop_rate= or make a new plan with it")
    if network is not None and {k: float(v) for k, v in network.items()} != plan.network:
        raise ConfigError(f"network={dict(network)!r} conflicts with the plan's network={plan.network!r}; drop "
                          "network= or make a new plan with it")
    if profile:
        raise ConfigError("profile=True measures stage times to make a plan, but a plan was given; drop profile= "
                          "or the plan (bitpipe-fx partition --profile saves a profiled plan)")


def _auto_chose(given: ScheduleSpec, plan: Plan) -> bool:
    """Whether ``plan`` is what ``given`` = auto[:memory_limit=...] searched for (the same limit)."""
    if given.name != AUTO or plan.search is None:
        return False
    return parse_bytes(given.kwargs().get("memory_limit")) == plan.search.memory_limit


def _scalars(values: Mapping[str, object]) -> dict[str, Scalar]:
    return {str(k): v for k, v in values.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _config(model: nn.Module) -> dict[str, Scalar]:
    """The model's configuration (a dataclass ``config``, or a Hugging Face-style ``config.to_dict()``)."""
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return _scalars(dataclasses.asdict(config))
    to_dict = getattr(config, "to_dict", None)
    return _scalars(to_dict()) if callable(to_dict) else {}


def _inputs(example_inputs: object) -> list[str]:
    """One line per example tensor: its place, shape and dtype."""
    if isinstance(example_inputs, Mapping):
        items = list(example_inputs.items())
    elif isinstance(example_inputs, (tuple, list)):
        items = list(enumerate(example_inputs))
    else:
        items = [(0, example_inputs)]
    return [f"input {k}: {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
            for k, v in items if isinstance(v, torch.Tensor)]


def model_origin(model: nn.Module, example_inputs: object) -> Origin:
    """What a plan records about the model it was made for."""
    return Origin(type(model).__name__, tuple(sorted(_config(model).items())), tuple(_inputs(example_inputs)))


def origin_difference(planned: Origin, found: Origin) -> str:
    """The settings in which the model given differs from the one the plan was made for, as one clause."""
    diffs: list[str] = []
    if planned.model and planned.model != found.model:
        diffs.append(f"model {planned.model} in the plan, {found.model} here")
    was, now = dict(planned.config), dict(found.config)
    diffs += [f"{k}={was[k]!r} in the plan, {now[k]!r} here" for k in sorted(was) if k in now and was[k] != now[k]]
    diffs += [f"{a} in the plan, {b.partition(': ')[2]} here" for a, b in zip(planned.inputs, found.inputs) if a != b]
    flags = "".join(f" --arg {k}={v!r}" for k, v in planned.args)
    call = f"; the plan was made by `bitpipe-fx partition {planned.factory}{flags}`" if planned.factory else ""
    differ = f"differs: {'; '.join(diffs)}" if diffs else "differs in its graph"
    return f"this model {differ}{call}"


__all__ = ["Origin", "compile_settings", "model_origin", "origin_difference"]
