"""fx capture: the ``torch.fx.symbolic_trace`` fallback; leaf modules and custom autograd Functions stay one call."""

from __future__ import annotations

import inspect as pyinspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.passes.graph_form import Captured, build_module, rebuild, tied_names, unflattener
from bitpipe_fx.passes.opaque import function_call, functions_as_calls


class _Tracer(fx.Tracer):
    """torch.fx tracer over one bound call of ``forward`` (keyword and ``**kwargs`` inputs included): tensor
    inputs become placeholders, other inputs are specialised; user-chosen leaves stay opaque; built-in modules
    with tied parameters are traced through (so every read of a tied parameter is a get_attr under its canonical
    name)."""

    def __init__(self, leaves: Sequence[str | type], aliased: set[str], call: _Call) -> None:
        super().__init__()
        self.leaf_names = {x for x in leaves if isinstance(x, str)}
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.aliased = aliased
        self.call = call
        self.placeholders: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if any(f"{qualname}.{n}" in self.aliased for n, _ in m.named_parameters(recurse=True)):
            return False
        return super().is_leaf_module(m, qualname)

    def create_args_for_root(
        self, root_fn: Callable[..., Any], is_module: bool, concrete_args: Any = None
    ) -> tuple[Callable[..., Any], list[Any]]:
        values = {}
        for key in self.call.tensor_keys:
            proxy = self.create_proxy("placeholder", key, (), {})
            self.placeholders.append(proxy.node.name)
            values[key] = proxy
        args, kwargs = self.call.with_values(values)
        return lambda root: root_fn(root, *args, **kwargs), [self.root]

    def apply_function(self, function: type, apply: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """A custom autograd Function on traced values becomes one call node (its backward is kept)."""
        if any(isinstance(x, fx.Proxy) for x in pytree.tree_leaves((args, kwargs))):
            return self.create_proxy("call_function", function_call(function), args, kwargs)
        return apply(*args, **kwargs)


class _Call:
    """One call of ``forward`` bound to its signature; inputs by name (``*args`` as name_i, ``**kwargs`` by key)."""

    def __init__(self, sig: pyinspect.Signature, args: tuple, kwargs: dict) -> None:
        self.sig = sig
        self.bound = sig.bind(*args, **kwargs)
        self.bound.apply_defaults()
        self.named: dict[str, Any] = {}
        for name, value in self.bound.arguments.items():
            kind = sig.parameters[name].kind
            if kind is pyinspect.Parameter.VAR_POSITIONAL:
                self.named.update({f"{name}_{i}": v for i, v in enumerate(value)})
            elif kind is pyinspect.Parameter.VAR_KEYWORD:
                self.named.update(value)
            else:
                self.named[name] = value
        self.tensor_keys = [k for k, v in self.named.items() if isinstance(v, torch.Tensor)]

    def with_values(self, values: dict[str, Any]) -> tuple[tuple, dict]:
        """(args, kwargs) of this call with the inputs named in ``values`` replaced."""
        bound = pyinspect.BoundArguments(self.sig, dict(self.bound.arguments))
        for name, value in bound.arguments.items():
            kind = self.sig.parameters[name].kind
            if kind is pyinspect.Parameter.VAR_POSITIONAL:
                bound.arguments[name] = tuple(values.get(f"{name}_{i}", v) for i, v in enumerate(value))
            elif kind is pyinspect.Parameter.VAR_KEYWORD:
                bound.arguments[name] = {k: values.get(k, v) for k, v in value.items()}
            else:
                bound.arguments[name] = values.get(name, value)
        return bound.args, bound.kwargs


def from_symbolic_trace(
    model: nn.Module, args: tuple, kwargs: dict, training: bool, leaves: Sequence[str | type]
) -> Captured:
    """Trace ``model`` with torch.fx; ``leaves`` and custom autograd Functions stay one call each."""
    canonical, tied = tied_names(model)
    sig = pyinspect.signature(model.forward)
    example = _Call(sig, args, kwargs)
    aliased = {name for name, first in canonical.items() if name != first}
    tracer = _Tracer(leaves, aliased, example)
    with functions_as_calls(tracer.apply_function):
        traced_graph = tracer.trace(model)
    source = fx.GraphModule(tracer.root, traced_graph)
    out_node = next(n for n in traced_graph.nodes if n.op == "output")
    flat, out_spec = pytree.tree_flatten(out_node.args[0])
    out_node.args = (tuple(flat),)
    names = tuple(tracer.placeholders)
    graph, out_leaves, constants = rebuild(model, source, {}, list(names))
    keys = example.tensor_keys

    def flatten(call_args: tuple, call_kwargs: dict) -> list[torch.Tensor]:
        try:
            got = _Call(sig, call_args, call_kwargs)
        except TypeError as exc:
            raise ConfigError(f"inputs do not match {type(model).__name__}.forward{sig}: {exc}") from exc
        values = [got.named.get(k) for k in keys]
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ConfigError(f"the captured graph needs tensors for {keys}; got {[type(v) for v in values]}")
        return values

    return Captured(
        graph_module=build_module(model, graph, constants),
        model=model,
        method="symbolic_trace",
        input_names=names,
        example_inputs=tuple(example.named[k] for k in keys),
        tied=tied,
        constants=constants,
        training=training,
        _flatten=flatten,
        _unflatten=unflattener(out_leaves, out_spec),
    )
