"""The `bitpipe-fx inspect` and `bitpipe-fx partition` sub-commands (the auto-partition tool).

``MODULE:FACTORY`` names a function that returns ``(model, example_inputs)`` for one micro-batch; MODULE is a
dotted module name (``bitpipe_fx.examples.models``) or a path to a ``.py`` file. ``--arg KEY=VALUE`` passes
keyword arguments to the factory (values are Python literals, e.g. ``--arg layers=16``).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.schedules.spec import parse_spec, schedule_spec


def add_parser(subparsers: Any, name: str, help: str) -> argparse.ArgumentParser:
    """Register ``inspect`` or ``partition`` and its arguments."""
    parser = subparsers.add_parser(name, help=help, description=f"{help}.\n\n{__doc__}")
    parser.add_argument("target", metavar="MODULE:FACTORY", help="factory returning (model, example_inputs)")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="factory keyword argument")
    parser.add_argument("--schedule", default="bitpipe", help="schedule spec NAME[:key=value,...], or auto")
    parser.add_argument("--memory-limit", default=None, help="with --schedule auto: peak bytes per device (12GiB)")
    parser.add_argument("--devices", "-d", type=int, default=4, help="pipeline devices D")
    parser.add_argument("--microbatches", "-n", type=int, default=None, help="micro-batches N (default: 2*D)")
    parser.add_argument("--flop-rate", type=float, default=1e12, help="assumed FLOP/s for times")
    parser.add_argument("--profile", action="store_true", help="measure stage times and re-balance with them")
    parser.add_argument("--out", required=name == "partition", help="write the plan as JSON to this path")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the plan of the factory's model for the schedule spec; print it, and save it with --out."""
    from bitpipe_fx.compiler import build_plan

    spec = parse_spec(args.schedule)  # before the model is built: a typo costs nothing
    if args.memory_limit is not None:
        spec = schedule_spec(spec, {"memory_limit": args.memory_limit})
    kwargs = parse_kwargs(args.arg)
    model, example_inputs = load_factory(args.target, kwargs)
    plan, _ = build_plan(
        model,
        example_inputs,
        spec.name,
        args.devices,
        args.microbatches,
        flop_rate=args.flop_rate,
        profile=args.profile,
        **spec.kwargs(),
    )
    plan = replace(plan, origin=plan.origin.made_by(args.target, kwargs))
    print(plan.summary())
    if args.out:
        plan.save(args.out)
        print(f"\nplan written to {args.out}")
    return 0


def parse_kwargs(items: list[str]) -> dict[str, Any]:
    """``['layers=16', 'dropout=0.1']`` -> ``{'layers': 16, 'dropout': 0.1}`` (non-literals stay strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--arg expects KEY=VALUE with KEY a Python identifier, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def load_factory(target: str, kwargs: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Import MODULE:FACTORY, call it, and check that it returned (model, example_inputs)."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"target {target!r} must be MODULE:FACTORY, e.g. bitpipe_fx.examples.models:gpt or path/to/file.py:make"
        )
    module = _import(module_name)
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = sorted(
            n
            for n, v in vars(module).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        )
        raise ConfigError(f"{module_name!r} has no callable {attr!r}; callables there: {found}")
    try:
        result = factory(**(kwargs or {}))
    except (TypeError, ValueError) as exc:  # a keyword it does not take, or a value it refuses (--arg)
        raise ConfigError(f"calling {target} with {kwargs or {}} failed: {exc}") from exc
    if not (isinstance(result, tuple) and len(result) == 2):
        raise ConfigError(f"{target} must return (model, example_inputs), got {type(result).__name__}")
    return result


def _import(name: str) -> Any:
    if name.endswith(".py") or "/" in name or "\\" in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"no such file {name!r} (from MODULE:FACTORY); give an existing .py path or a module")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {name!r} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(path.stem, module)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here = str(Path.cwd())
        local = Path(here, f"{exc.name}.py").is_file()
        if exc.name == name.split(".")[0] and here not in sys.path and local:
            sys.path.insert(0, here)  # a module of the current folder, as `python -m` finds it (spawned ranks too)
            return importlib.import_module(name)
        raise ConfigError(
            f"cannot import module {name!r} ({exc}); give a dotted module on sys.path or a path to a .py file"
        ) from exc
