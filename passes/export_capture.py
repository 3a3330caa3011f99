"""export capture: ``torch.export.export(strict=False)`` on one micro-batch, unlifted to the original FQNs.

Graphs from ``torch.export`` are specialised to the example micro-batch's shapes; non-tensor inputs are
specialised into the graph and checked on every later call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from bitpipe_fx.errors import ConfigError, TraceError
from bitpipe_fx.passes.graph_form import Captured, build_module, rebuild, tied_names, unflattener


def from_export(model: nn.Module, args: tuple, kwargs: dict, training: bool) -> Captured:
    ep = torch.export.export(model, args, kwargs, strict=False)
    unlifted = ep.module()
    in_spec, out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
    leaves = pytree.tree_leaves((args, kwargs))
    placeholders = [n for n in unlifted.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(leaves):
        raise TraceError(f"torch.export produced {len(placeholders)} inputs for {len(leaves)} example input leaves")
    env: dict[fx.Node, Any] = {}
    inputs: list[tuple[str, torch.Tensor]] = []
    for node, leaf in zip(placeholders, leaves):
        if isinstance(leaf, torch.Tensor):
            inputs.append((node.name, leaf))
        else:
            env[node] = leaf  # non-tensor inputs are specialised into the graph
    tensor_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    constant_leaves = {i: leaf for i, leaf in enumerate(leaves) if not isinstance(leaf, torch.Tensor)}
    graph, out_leaves, constants = rebuild(model, unlifted, env, [n for n, _ in inputs])

    def flatten(call_args: tuple, call_kwargs: dict) -> list[torch.Tensor]:
        ordered = {k: call_kwargs[k] for k in kwargs if k in call_kwargs} | call_kwargs
        got_leaves, spec = pytree.tree_flatten((call_args, ordered))
        if spec != in_spec:
            raise ConfigError(
                f"inputs have structure {spec}, but the model was captured with {in_spec}; "
                "call it with the same positional/keyword structure as the example inputs"
            )
        for i, value in constant_leaves.items():
            if got_leaves[i] != value:
                raise ConfigError(
                    f"non-tensor input #{i} is {got_leaves[i]!r} but the graph was specialised to {value!r}; "
                    "capture again with that value"
                )
        return [got_leaves[i] for i in tensor_slots]

    return Captured(
        graph_module=build_module(model, graph, constants),
        model=model,
        method="export",
        input_names=tuple(n for n, _ in inputs),
        example_inputs=tuple(t for _, t in inputs),
        tied=tied_names(model)[1],
        constants=constants,
        training=training,
        _flatten=flatten,
        _unflatten=unflattener(out_leaves, out_spec),
    )
