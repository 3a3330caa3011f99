"""fx capture: the ``torch.fx.symbolic_trace`` fallback, where user-chosen leaf modules stay opaque calls."""

from __future__ import annotations

import inspect as pyinspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from bitpipe_fx.errors import ConfigError, TraceError
from bitpipe_fx.passes.graph_form import Captured, build_module, rebuild, tied_names, unflattener


class _Tracer(fx.Tracer):
    """torch.fx tracer: user-chosen leaves stay opaque; built-in modules with tied parameters are traced through
    (so every read of a tied parameter is a get_attr under its canonical name)."""

    def __init__(self, leaves: Sequence[str | type], aliased: set[str]) -> None:
        super().__init__()
        self.leaf_names = {x for x in leaves if isinstance(x, str)}
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.aliased = aliased

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if any(f"{qualname}.{n}" in self.aliased for n, _ in m.named_parameters(recurse=True)):
            return False
        return super().is_leaf_module(m, qualname)


def from_symbolic_trace(
    model: nn.Module, args: tuple, kwargs: dict, training: bool, leaves: Sequence[str | type]
) -> Captured:
    canonical, tied = tied_names(model)
    sig = pyinspect.signature(model.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        raise TraceError(f"{type(model).__name__}.forward takes *args/**kwargs, which torch.fx cannot trace")
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    tensor_params = [k for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)]
    concrete = {k: v for k, v in bound.arguments.items() if k not in tensor_params}
    aliased = {name for name, first in canonical.items() if name != first}
    tracer = _Tracer(leaves, aliased)
    traced_graph = tracer.trace(model, concrete_args=concrete)
    source = fx.GraphModule(tracer.root, traced_graph)
    env: dict[fx.Node, Any] = {}
    for node in traced_graph.nodes:
        if node.op == "placeholder" and node.name not in tensor_params:
            env[node] = concrete.get(node.target)
    out_node = next(n for n in traced_graph.nodes if n.op == "output")
    flat, out_spec = pytree.tree_flatten(out_node.args[0])
    out_node.args = (tuple(flat),)
    graph, out_leaves, constants = rebuild(model, source, env, tensor_params)
    _drop_unused_placeholders(graph, tensor_params)
    names = tuple(tensor_params)

    def flatten(call_args: tuple, call_kwargs: dict) -> list[torch.Tensor]:
        try:
            got = sig.bind(*call_args, **call_kwargs)
        except TypeError as exc:
            raise ConfigError(f"inputs do not match {type(model).__name__}.forward{sig}: {exc}") from exc
        values = [got.arguments.get(k) for k in names]
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ConfigError(f"the captured graph needs tensors for {list(names)}; got {[type(v) for v in values]}")
        return values

    return Captured(
        graph_module=build_module(model, graph, constants),
        model=model,
        method="symbolic_trace",
        input_names=names,
        example_inputs=tuple(bound.arguments[k] for k in names),
        tied=tied,
        constants=constants,
        training=training,
        _flatten=flatten,
        _unflatten=unflattener(out_leaves, out_spec),
    )


def _drop_unused_placeholders(graph: fx.Graph, keep: list[str]) -> None:
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.name not in keep and not node.users:
            graph.erase_node(node)
