"""How a captured graph uses its model inputs: those it updates in place, and those that index an embedding.

A stage clones a model input it updates in place (passes/split.py): the micro-batches are views of one batch
sharing one version counter, so an in-place update of one would invalidate what autograd saved for another
(eager training on the whole batch never sees this), and the caller's batch stays as it was. The cost pass keeps
such an update and every later read of that input in one stage (passes/cost.py). A model input used directly as
the indices of an embedding table is range-checked on every batch (runtime/batch.py), so an out-of-vocabulary id
is a ConfigError naming the id and the table before anything runs, not an IndexError inside a stage.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from bitpipe_fx.passes.graph_form import Captured, fetch, mutated_args
from bitpipe_fx.passes.stages import IndexRange


def mutated_inputs(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """The placeholders (model inputs) that ``nodes`` update in place."""
    return {arg for node in nodes for arg in mutated_args(node) if arg.op == "placeholder"}


def index_ranges(captured: Captured) -> tuple[IndexRange, ...]:
    """Every model input read directly as embedding indices, with the smallest table it indexes."""
    found: dict[str, IndexRange] = {}
    for node in captured.graph.nodes:
        use = _embedding(node, captured)
        if use is None or (use.input in found and found[use.input].rows <= use.rows):
            continue
        found[use.input] = use
    return tuple(found.values())


def _embedding(node: fx.Node, captured: Captured) -> IndexRange | None:
    """The IndexRange of ``node`` when it is an embedding lookup whose indices are a model input."""
    if node.op == "call_function" and node.target in (torch.ops.aten.embedding.default, F.embedding):
        weight, indices = node.args[:2] if node.target is torch.ops.aten.embedding.default else node.args[1::-1]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return None
        table = str(weight.target)
        value = captured.constants.get(table)
        rows = int((value if value is not None else fetch(captured.graph_module, table)).shape[0])
    elif node.op == "call_module" and isinstance(module := captured.graph_module.get_submodule(str(node.target)),
                                                 nn.Embedding):
        indices, table, rows = node.args[0], f"{node.target}.weight", module.num_embeddings
    else:
        return None
    if not (isinstance(indices, fx.Node) and indices.op == "placeholder"):
        return None
    return IndexRange(input=indices.name, rows=rows, table=table)
