"""Split a backward into I (input gradients now) and W (weight gradients later) without recomputing.

Asking autograd for the input gradients alone skips every weight-gradient product, but asking later for the
weight gradients from the outputs would run the whole input-gradient chain again. Instead, I records the
gradient that arrives at each *boundary node*: an autograd node on the input-gradient path with a child
sub-graph that leads only to parameters (a Linear's addmm, a LayerNorm's backward). W then starts at those
nodes with the recorded gradients and computes only their weight branches.

A weight branch must be exclusive to its boundary node (no other node feeds gradients into it), else
starting there would miss or double-count contributions; parameters under shared branches (a weight used
twice in one stage) are computed in I instead and handed to W as finished gradients.

Which walk positions are boundary nodes is structural: every micro-batch of a stage builds the same graph,
so a ``StageSplitter`` analyses it once (a ``WeightPlan``) and afterwards only walks the new graph and checks
its signature, re-analysing if the structure changed. W needs one engine call per boundary node: boundary
nodes lie on one input-gradient chain, and a single call rooted at all of them would make autograd run
that chain again between them (it executes every node on a path to a requested parameter).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

Node = object  # torch.autograd.graph.Node (C++ objects; hashable by identity)
_INPUT, _OTHER = -2, -1  # leaf markers in a signature besides a parameter's index


@dataclass(frozen=True)
class WeightPlan:
    """One stage's backward structure: graph signature, boundary positions with param indices, eager params."""

    signature: tuple
    boundary: tuple[tuple[int, tuple[int, ...]], ...]
    eager: tuple[int, ...]


@dataclass
class DeferredWeights:
    """What W needs: per boundary node the recorded gradients and its parameters; finished eager grads."""

    boundary: list[tuple[Node, list[torch.nn.Parameter]]] = field(default_factory=list)
    recorded: dict[int, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)
    eager: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)


@dataclass(frozen=True)
class _Walk:
    """The nodes reachable from the roots in a deterministic order, each node's children as positions."""

    nodes: list[Node]
    children: list[tuple[int, ...]]
    signature: tuple


def _walk(roots: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor], params: Sequence[torch.nn.Parameter]
          ) -> _Walk:
    """Depth-first walk from the roots; the signature pins node types, edges and which leaf is which."""
    root_edges = [get_gradient_edge(r) for r in roots]
    pos: dict[Node, int] = {}
    nodes: list[Node] = []
    nexts: list[tuple] = []
    stack = [e.node for e in reversed(root_edges)]
    while stack:
        node = stack.pop()
        if node in pos:
            continue
        pos[node] = len(nodes)
        nodes.append(node)
        nf = node.next_functions
        nexts.append(nf)
        stack.extend(child for child, _ in reversed(nf) if child is not None)
    marker = {get_gradient_edge(t).node: _INPUT for t in leaves}
    marker.update({get_gradient_edge(p).node: i for i, p in enumerate(params)})
    children = [tuple(pos[c] for c, _ in nf if c is not None) for nf in nexts]
    signature = (
        tuple((pos[e.node], e.output_nr) for e in root_edges),
        tuple((type(n), tuple((-1 if c is None else pos[c], k) for c, k in nf), marker.get(n, _OTHER))
              for n, nf in zip(nodes, nexts)),
    )
    return _Walk(nodes, children, signature)


def _post_order(children: list[tuple[int, ...]], starts: Sequence[int]) -> list[int]:
    """Positions with every node after all its children."""
    order: list[int] = []
    done: set[int] = set()
    stack: list[tuple[int, bool]] = [(s, False) for s in starts]
    while stack:
        n, expanded = stack.pop()
        if expanded:
            order.append(n)
            continue
        if n in done:
            continue
        done.add(n)
        stack.append((n, True))
        stack.extend((c, False) for c in children[n] if c not in done)
    return order


def _analyse(walk: _Walk) -> WeightPlan:
    """Boundary nodes with exclusive weight branches (and their params), and the params left for I."""
    roots, marks = walk.signature[0], [entry[2] for entry in walk.signature[1]]
    children = walk.children
    parents: dict[int, set[int]] = {}
    for n, kids in enumerate(children):
        for c in kids:
            parents.setdefault(c, set()).add(n)
    order = _post_order(children, [r for r, _ in roots])
    reach_in = [False] * len(children)
    reach_p = [False] * len(children)
    for n in order:
        reach_in[n] = marks[n] == _INPUT or any(reach_in[c] for c in children[n])
        reach_p[n] = marks[n] >= 0 or any(reach_p[c] for c in children[n])

    def weight_only(n: int) -> bool:
        return reach_p[n] and not reach_in[n]

    boundary: list[tuple[int, tuple[int, ...]]] = []
    deferred: set[int] = set()
    for n in order:
        if weight_only(n):
            continue
        branch: set[int] = set()
        todo = [c for c in children[n] if weight_only(c)]
        while todo:
            b = todo.pop()
            if b not in branch:
                branch.add(b)
                todo.extend(children[b])
        if branch and all(parents.get(b, set()) <= branch | {n} for b in branch):
            ps = tuple(sorted(marks[b] for b in branch if marks[b] >= 0))
            boundary.append((n, ps))
            deferred.update(ps)
    reached = sorted(marks[n] for n in range(len(children)) if marks[n] >= 0 and reach_p[n])
    return WeightPlan(walk.signature, tuple(boundary), tuple(i for i in reached if i not in deferred))


class StageSplitter:
    """Split backward of one stage's parameters; the weight plan is analysed once and reused per micro-batch."""

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.plan: WeightPlan | None = None
        self.analyses = 0  # how often the graph was analysed (1 while the structure stays the same)

    def _plan(self, walk: _Walk) -> WeightPlan:
        if self.plan is None or self.plan.signature != walk.signature:
            self.plan = _analyse(walk)
            self.analyses += 1
        return self.plan

    def backward_input(
        self, roots: Sequence[torch.Tensor], root_grads: Sequence[torch.Tensor] | None, leaves: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor | None], DeferredWeights]:
        """Gradients of ``leaves`` (retaining the graph), and what ``backward_weight`` needs."""
        walk = _walk(roots, leaves, self.params)
        plan = self._plan(walk)
        params = self.params
        deferred = DeferredWeights(boundary=[(walk.nodes[n], [params[i] for i in ps]) for n, ps in plan.boundary])
        recorded = deferred.recorded

        def recorder(key: int):
            def record(grads: tuple[torch.Tensor | None, ...]) -> None:
                recorded[key] = tuple(grads)

            return record

        hooks = [node.register_prehook(recorder(id(node))) for node, _ in deferred.boundary]
        eager = [params[i] for i in plan.eager]
        try:
            grads = torch.autograd.grad(roots, [*leaves, *eager], root_grads, retain_graph=True, allow_unused=True)
        finally:
            for h in hooks:
                h.remove()
        deferred.eager = [(p, g) for p, g in zip(eager, grads[len(leaves):]) if g is not None]
        return list(grads[: len(leaves)]), deferred


def backward_input(
    roots: Sequence[torch.Tensor], root_grads: Sequence[torch.Tensor] | None, leaves: Sequence[torch.Tensor],
    params: Sequence[torch.nn.Parameter],
) -> tuple[list[torch.Tensor | None], DeferredWeights]:
    """One-off split (no reuse of the analysis): gradients of ``leaves`` and what ``backward_weight`` needs."""
    return StageSplitter(params).backward_input(roots, root_grads, leaves)


def backward_weight(deferred: DeferredWeights) -> None:
    """Accumulate every parameter's gradient into ``.grad``: boundary nodes' weight branches, then eager ones."""
    for node, params in deferred.boundary:
        recorded = deferred.recorded.get(id(node))
        if recorded is None or not params:
            continue
        edges = [GradientEdge(node, k) for k, g in enumerate(recorded) if g is not None]
        torch.autograd.backward(edges, [g for g in recorded if g is not None], inputs=params)
    for p, g in deferred.eager:
        p.grad.add_(g)
