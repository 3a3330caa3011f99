"""Split a backward into I (input gradients now) and W (weight gradients later) without recomputing.

Asking autograd for the input gradients alone skips every weight-gradient product, but asking later for the
weight gradients from the outputs would run the whole input-gradient chain again. Instead, I records the
gradient that arrives at each *boundary node*: an autograd node on the input-gradient path with a child
sub-graph that leads only to parameters (a Linear's addmm, a LayerNorm's backward). W then starts at those
nodes with the recorded gradients and computes only their weight branches.

A weight branch must be exclusive to its boundary node (no other node feeds gradients into it), else
starting there would miss or double-count contributions; parameters under shared branches (a weight used
twice in one stage) are computed in I instead and handed to W as finished gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

Node = object  # torch.autograd.graph.Node (C++ objects; hashable by identity)


def _children(node: Node) -> list[Node]:
    return [child for child, _ in node.next_functions if child is not None]


@dataclass
class DeferredWeights:
    """What W needs: per boundary node the recorded gradients and its parameters; finished eager grads."""

    boundary: list[tuple[Node, list[torch.nn.Parameter]]] = field(default_factory=list)
    recorded: dict[int, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)
    eager: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)


def _analyse(roots: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor], params: Sequence[torch.nn.Parameter]):
    """Boundary nodes with exclusive weight branches (and their params), and the params left for I."""
    leaf_nodes = {id(get_gradient_edge(t).node) for t in leaves}
    param_of = {id(get_gradient_edge(p).node): p for p in params}
    starts = [get_gradient_edge(r).node for r in roots]
    order: list[Node] = []  # post-order: children before parents
    parents: dict[int, set[int]] = {}
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(n, False) for n in starts]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            parents.setdefault(id(child), set()).add(id(node))
            if id(child) not in seen:
                stack.append((child, False))
    reach_in: dict[int, bool] = {}
    reach_p: dict[int, bool] = {}
    for node in order:
        kids = _children(node)
        reach_in[id(node)] = id(node) in leaf_nodes or any(reach_in[id(c)] for c in kids)
        reach_p[id(node)] = id(node) in param_of or any(reach_p[id(c)] for c in kids)

    def weight_only(n: Node) -> bool:
        return reach_p[id(n)] and not reach_in[id(n)]

    boundary: list[tuple[Node, list[torch.nn.Parameter]]] = []
    deferred: set[int] = set()
    for node in order:
        if weight_only(node):
            continue
        branch: dict[int, Node] = {}
        todo = [c for c in _children(node) if weight_only(c)]
        while todo:
            n = todo.pop()
            if id(n) not in branch:
                branch[id(n)] = n
                todo.extend(_children(n))
        if not branch:
            continue
        inside = set(branch) | {id(node)}
        if all(parents.get(i, set()) <= inside for i in branch):
            ps = [param_of[i] for i in branch if i in param_of]
            boundary.append((node, ps))
            deferred.update(id(p) for p in ps)
    reached = [p for p in params if reach_p.get(id(get_gradient_edge(p).node), False)]
    eager = [p for p in reached if id(p) not in deferred]
    return boundary, eager


def backward_input(
    roots: Sequence[torch.Tensor], root_grads: Sequence[torch.Tensor] | None, leaves: Sequence[torch.Tensor],
    params: Sequence[torch.nn.Parameter],
) -> tuple[list[torch.Tensor | None], DeferredWeights]:
    """Gradients of ``leaves`` (retaining the graph), and what ``backward_weight`` needs."""
    boundary, eager = _analyse(roots, leaves, params)
    deferred = DeferredWeights(boundary=boundary)

    def recorder(key: int):
        def record(grads: tuple[torch.Tensor | None, ...]) -> None:
            deferred.recorded[key] = tuple(grads)

        return record

    hooks = [node.register_prehook(recorder(id(node))) for node, _ in boundary]
    try:
        grads = torch.autograd.grad(roots, [*leaves, *eager], root_grads, retain_graph=True, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    deferred.eager = [(p, g) for p, g in zip(eager, grads[len(leaves):]) if g is not None]
    return list(grads[: len(leaves)]), deferred


def backward_weight(deferred: DeferredWeights) -> None:
    """Accumulate every parameter's gradient into ``.grad``: boundary nodes' weight branches, then eager ones."""
    for node, params in deferred.boundary:
        recorded = deferred.recorded.get(id(node))
        if recorded is None or not params:
            continue
        edges = [(GradientEdge(node, k), g) for k, g in enumerate(recorded) if g is not None]
        torch.autograd.backward([e for e, _ in edges], [g for _, g in edges], inputs=params)
    for p, g in deferred.eager:
        p.grad.add_(g)
