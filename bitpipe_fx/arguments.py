"""compile()'s and CompiledPipeline's arguments, checked before anything is captured, launched or sent.

Each check refuses one bad value with a ConfigError that names it and says what to pass instead; a value of the
right kind that a later stage refuses (a schedule's device count, a batch's shape) is that stage's to refuse.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.plan import Plan
from bitpipe_fx.runtime import nonfinite
from bitpipe_fx.schedules.spec import ScheduleSpec


def positive_int(name: str, value: object, optional: bool = False) -> None:
    """``value`` is an int >= 1 (a bool is not), or None when ``optional``."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_flag(name: str, value: object) -> None:
    """``value`` is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def check_pipeline(loss_fn: object, optimizer: object, data_parallel: object, timeout: object, seed: object,
                   on_nonfinite: object) -> None:
    """The arguments CompiledPipeline itself takes (compile passes them through)."""
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a function (model output, targets) -> scalar loss tensor, got "
                          f"{loss_fn!r}; e.g. lambda logits, targets: F.cross_entropy(logits, targets)")
    if optimizer is not None and (isinstance(optimizer, torch.optim.Optimizer) or not callable(optimizer)):
        raise ConfigError(
            f"optimizer must be a factory called with the local parameters, e.g. "
            f"lambda params: torch.optim.AdamW(params, lr=1e-3); got {type(optimizer).__name__}"
        )
    positive_int("data_parallel", data_parallel)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise ConfigError(f"timeout must be a finite number of seconds > 0 (the bound of every wait in a "
                          f"distributed step), got {timeout!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer (it keys every micro-batch's random stream), "
                          f"got {seed!r}")
    if on_nonfinite not in nonfinite.POLICIES:
        raise ConfigError(f"on_nonfinite must be one of {list(nonfinite.POLICIES)}, got {on_nonfinite!r}")


def check_compile(model: object, example_inputs: object, schedule: object, devices: object, microbatches: object,
                  plan: object, trace_path: object, leaf_modules: object) -> None:
    """compile()'s own arguments (the pipeline's are check_pipeline's)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise ConfigError(f"example_inputs must be ONE micro-batch: a tensor, a tuple of positional inputs or a "
                          f"dict of keyword inputs, got {type(example_inputs).__name__}")
    if not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(example_inputs)):
        raise ConfigError(f"example_inputs {example_inputs!r} hold no tensor; pass one micro-batch of the model's "
                          "inputs (their rows are how a batch is split)")
    if schedule is not None and not isinstance(schedule, (str, ScheduleSpec)):
        raise ConfigError(f"schedule must be a spec string NAME[:key=value,...] such as 'bitpipe' or "
                          f"'interleaved:chunks=2', got {schedule!r}")
    positive_int("devices", devices, optional=True)
    positive_int("microbatches", microbatches, optional=True)
    if plan is not None and not isinstance(plan, (str, os.PathLike, Plan)):
        raise ConfigError(f"plan must be a Plan or the path of one saved by `bitpipe-fx partition`, got "
                          f"{type(plan).__name__}")
    if trace_path is not None and not isinstance(trace_path, (str, os.PathLike)):
        raise ConfigError(f"trace_path must be a file path (str or Path) or None, got {trace_path!r}")
    _check_leaves(leaf_modules)


def _check_leaves(leaf_modules: object) -> None:
    if isinstance(leaf_modules, (str, type)) or not isinstance(leaf_modules, Iterable):
        raise ConfigError(f"leaf_modules must be a tuple of submodule FQNs or nn.Module classes, got "
                          f"{leaf_modules!r}; wrap a single one: leaf_modules=({leaf_modules!r},)")
    for item in leaf_modules:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise ConfigError(f"leaf_modules holds {item!r}; each entry is a submodule FQN (str) or an nn.Module "
                              "class")


def check_optimizer(optimizer: object, params: list[nn.Parameter], factory: Callable[..., object]) -> None:
    """The factory's result is an optimizer over (some of) the parameters it was given, never over others."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"the optimizer factory returned {type(optimizer).__name__}, not a torch.optim.Optimizer; "
                          "return one built from its argument: lambda params: torch.optim.AdamW(params, lr=1e-3)")
    given = {id(p) for p in params}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in held if id(p) not in given]
    if foreign or (params and not held):
        what = f"{len(foreign)} of its {len(held)} tensors are not" if foreign else "it holds none of"
        raise ConfigError(
            f"the optimizer factory {getattr(factory, '__name__', factory)!r} returned an optimizer whose "
            f"parameters are not the ones it was given ({what} the {len(params)} pipeline parameters): the pipeline "
            "trains its own copies, so an optimizer over model.parameters() would train nothing; build it from "
            "the argument: lambda params: torch.optim.SGD(params, lr=0.1)"
        )
