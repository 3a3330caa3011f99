"""capture: one micro-batch's example inputs -> a flat ``torch.fx.GraphModule`` with the original FQNs.

Tries ``torch.export.export(strict=False)`` (passes/export_capture.py), then ``torch.fx.symbolic_trace``
(passes/fx_capture.py); the result is in the normal form of passes/graph_form.py. When both fail, a
TraceError (passes/trace_errors.py) names the construct and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.passes.export_capture import from_export
from bitpipe_fx.passes.fx_capture import from_symbolic_trace
from bitpipe_fx.passes.graph_form import TRAINING_FLAG, Captured, buffers_kept, compute_nodes, tied_names
from bitpipe_fx.passes.opaque import leaf_instances
from bitpipe_fx.passes.trace_errors import failing_module, is_data_dependent, own_failure, trace_error

__all__ = ["TRAINING_FLAG", "Captured", "capture", "compute_nodes", "normalize_inputs", "tied_names"]


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """A tensor, a tuple of positional args, or a dict of keyword args -> (args, kwargs)."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def capture(
    model: nn.Module,
    example_args: Any = (),
    example_kwargs: dict | None = None,
    *,
    leaf_modules: Sequence[str | type] = (),
) -> Captured:
    """Capture ``model`` on one micro-batch: torch.export (strict=False), else torch.fx.symbolic_trace.

    ``leaf_modules`` (FQNs or classes) run as one opaque call each (passes/opaque.py), as do custom autograd
    Functions; a submodule where torch.export meets data-dependent control flow is added to them by class and
    the export retried. Raises TraceError, naming the module and the ``leaf_modules=`` fix, when both fail, or
    naming the module and line that raised when the model's own forward fails on the example inputs.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"capture needs an nn.Module, got {type(model).__name__}")
    missing = [x for x in leaf_modules if isinstance(x, str) and x not in dict(model.named_modules())]
    if missing:
        raise ConfigError(f"leaf_modules names {missing}, which are not submodules of {type(model).__name__}")
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})
    leaves = list(leaf_modules)
    was_training = model.training
    model.train()
    try:
        errors: list[tuple[str, BaseException]] = []
        while True:
            try:
                with buffers_kept(model):
                    return from_export(model, args, kwargs, was_training, leaf_instances(model, leaves))
            except Exception as exc:
                where = failing_module(model, exc) if is_data_dependent(exc) else None
                if not where or type(model.get_submodule(where)) in leaves or where in leaves:
                    errors.append(("torch.export.export(strict=False)", exc))
                    break
                leaves.append(type(model.get_submodule(where)))  # data-dependent code: keep that module opaque
        with buffers_kept(model):
            broken = own_failure(model, args, kwargs)  # the model's own error, not a tracer's
        if broken is not None:
            raise broken from errors[-1][1]
        try:
            with buffers_kept(model):
                return from_symbolic_trace(model, args, kwargs, was_training, leaves)
        except Exception as exc:
            errors.append(("torch.fx.symbolic_trace", exc))
        raise trace_error(model, errors, leaves) from errors[-1][1]
    finally:
        model.train(was_training)
