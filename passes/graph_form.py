"""The normal form of a captured graph: the one shape of graph every later pass sees.

- placeholders are the model's flat tensor inputs (``input_names``), in pytree order of ``(args, kwargs)``;
- parameters and buffers are read by ``get_attr`` nodes whose targets are the original, canonical FQNs
  (for a tied parameter, the name ``model.named_parameters()`` reports; every alias is in ``tied``);
- the output node returns a flat tuple of tensors; ``unflatten_output`` rebuilds the model's own output
  structure (tensor, tuple, dict, or a Hugging Face ``ModelOutput``) from it.

Train/eval: the model is captured in train mode (so dropout is in the graph), and every dropout (aten
dropout ops, and the ``dropout_p`` of scaled dot-product attention) reads its ``training`` flag from the
stage module at run time (a ``TrainingFlag`` submodule), so ``stage.eval()`` really turns dropout off.
Batch norm follows the mode too: it normalises with batch statistics and counts ``num_batches_tracked``
in train mode only, and uses the running statistics in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from bitpipe_fx.errors import TraceError
from bitpipe_fx.passes.opaque import MARKER, FunctionCall, OpaqueCall, emit

TRAINING_FLAG = "_bitpipe_training"  # call_module target that returns the stage module's ``training`` flag


def _aten(*names: str) -> frozenset:
    """The aten overloads ``op.overload`` that this torch version has."""
    found = set()
    for name in names:
        op, overload = name.split(".")
        packet = getattr(torch.ops.aten, op, None)
        if packet is not None and hasattr(packet, overload):
            found.add(getattr(packet, overload))
    return frozenset(found)


_DROPOUT_OPS = _aten(
    "dropout.default", "feature_dropout.default", "alpha_dropout.default", "feature_alpha_dropout.default"
)
# shape guards and assertions torch.export inserts (they differ between torch versions)
_DROPPED_OPS = _aten(
    "_assert_tensor_metadata.default",
    "_assert_scalar.default",
    "_assert_async.msg",
    "sym_constrain_range_for_size.default",
)


class TrainingFlag(nn.Module):
    """Parameter-free submodule whose output is the owning stage's train/eval mode."""

    def forward(self) -> bool:
        return self.training


@dataclass(frozen=True)
class Captured:
    """A model captured as one flat graph, plus how to feed it and how to read its output."""

    graph_module: fx.GraphModule
    model: nn.Module
    method: str  # "export" or "symbolic_trace"
    input_names: tuple[str, ...]
    example_inputs: tuple[torch.Tensor, ...]  # flat, in input_names order
    tied: dict[str, tuple[str, ...]]  # canonical FQN -> every name of that tensor (only tensors with >1 name)
    constants: dict[str, torch.Tensor]  # get_attr targets that are not model state (tensors created in forward)
    training: bool  # the model's mode when it was captured (stages start in this mode)
    _flatten: Callable[[tuple, dict], list[torch.Tensor]] = field(repr=False)
    _unflatten: Callable[[Sequence[torch.Tensor]], Any] = field(repr=False)

    def flatten_inputs(self, args: tuple, kwargs: dict | None = None) -> list[torch.Tensor]:
        """(args, kwargs) of one call with the example's structure -> tensors in ``input_names`` order."""
        return self._flatten(tuple(args), dict(kwargs or {}))

    def unflatten_output(self, flat: Sequence[torch.Tensor]) -> Any:
        """The graph's flat output tensors -> the model's own output structure."""
        return self._unflatten(flat)

    @property
    def opaque(self) -> tuple[str, ...]:
        """What runs as one call: leaf modules (by FQN) and custom autograd Functions (by class name)."""
        found = []
        for node in self.graph.nodes:
            if node.op == "call_module" and node.target != TRAINING_FLAG:
                found.append(str(node.target))
            elif node.op == "call_function" and isinstance(node.target, FunctionCall):
                found.append(node.target.function.__qualname__)
        return tuple(dict.fromkeys(found))

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def is_free(node: fx.Node) -> bool:
    """Nodes that compute nothing and are recreated in every stage that reads them (state, mode flag)."""
    return node.op == "get_attr" or (node.op == "call_module" and node.target == TRAINING_FLAG)


def mutated_args(node: fx.Node) -> list[fx.Node]:
    """Arguments that ``node`` updates in place."""
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        writes = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        bound = dict(zip((a.name for a in schema.arguments), node.args)) | dict(node.kwargs)
        return [bound[w] for w in writes if isinstance(bound.get(w), fx.Node)]
    if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("_"):
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    return []


def compute_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The nodes a partition assigns to stages, in topological (graph) order."""
    return [n for n in graph.nodes if n.op not in ("placeholder", "output") and not is_free(n)]


def tied_names(model: nn.Module) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """(alias -> canonical FQN for every parameter/buffer name, canonical -> all names when tied)."""
    canonical: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for named in (model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        first_name: dict[int, str] = {}
        for name, tensor in named:
            first = first_name.setdefault(id(tensor), name)
            canonical[name] = first
            groups.setdefault(first, []).append(name)
    return canonical, {k: tuple(v) for k, v in groups.items() if len(v) > 1}


def rebuild(
    model: nn.Module,
    source: fx.GraphModule,
    env: dict[fx.Node, Any],
    input_names: list[str],
    opaque: dict[int, OpaqueCall] | None = None,
) -> tuple[fx.Graph, list[Any], dict[str, torch.Tensor]]:
    """Copy ``source``'s graph into the normal form (see the module docstring); ``opaque`` resolves the markers
    of opaque calls (passes/opaque.py) into the calls themselves."""
    canonical, _ = tied_names(model)
    graph = fx.Graph()
    constants: dict[str, torch.Tensor] = {}
    for node in source.graph.nodes:
        if node.op == "placeholder":
            if node.name in input_names:
                env[node] = graph.placeholder(node.name)
                env[node].meta.update(node.meta)
        elif node.op == "get_attr":
            target = canonical.get(node.target)
            if target is None:
                target = node.target
                value = fetch(source, target)
                if isinstance(value, torch.Tensor):
                    constants[target] = value
            env[node] = graph.get_attr(target)
            env[node].meta.update(node.meta)
        elif _is_check(node):
            continue
        elif node.op == "output":
            flat = node.args[0]
            flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
            out = [env[x] if isinstance(x, fx.Node) else x for x in flat]
            return graph, _finish_output(graph, out), constants
        elif node.op == "call_function" and node.target is MARKER:
            env[node] = emit(graph, node, lambda x: env[x], (opaque or {})[node.args[1]])
        else:
            new = graph.node_copy(node, lambda x: env[x])
            _follow_mode(graph, new)
            env[node] = new
    raise TraceError("captured graph has no output node")


def _is_check(node: fx.Node) -> bool:
    """Input guards and shape assertions torch.export adds: they check the example's shapes, compute nothing."""
    return (node.op == "call_module" and node.target == "_guards_fn") or (
        node.op == "call_function" and node.target in _DROPPED_OPS
    )


def _follow_mode(graph: fx.Graph, node: fx.Node) -> None:
    """Make dropout captured in train mode read the stage module's mode at run time."""
    if node.op != "call_function":
        return
    if node.target in _DROPOUT_OPS and len(node.args) >= 3 and node.args[2] is True:
        node.args = (*node.args[:2], _training_flag(graph, node))
    elif node.target is torch.ops.aten.batch_norm.default and len(node.args) > 5 and node.args[5] is True:
        node.args = (*node.args[:5], _training_flag(graph, node), *node.args[6:])
    elif node.target is torch.ops.aten.add_.Tensor and _is_batch_counter(node.args[0]) and node.args[1] == 1:
        node.args = (node.args[0], _training_flag(graph, node))  # adds True/False: 1 in train mode only
    elif node.target is torch.ops.aten.scaled_dot_product_attention.default:
        p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        if isinstance(p, (int, float)) and p > 0:
            with graph.inserting_before(node):
                value = graph.call_function(train_value, (_training_flag(graph, node), float(p), 0.0))
            if "dropout_p" in node.kwargs:
                node.kwargs = {**node.kwargs, "dropout_p": value}
            else:
                node.args = (*node.args[:4], value, *node.args[5:])


@contextmanager
def buffers_kept(*modules: nn.Module) -> Iterator[None]:
    """Run the body (a tracing or measuring forward) and put every buffer of ``modules`` back as it was:
    the caller's model is never changed by compile (e.g. batch-norm statistics and counters)."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _is_batch_counter(value: Any) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr" and str(value.target).endswith("num_batches_tracked")


def train_value(training: bool, train: float, evaluate: float) -> float:
    """``train`` in train mode, ``evaluate`` in eval mode (e.g. an attention dropout probability)."""
    return train if training else evaluate


def _training_flag(graph: fx.Graph, before: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        return graph.call_module(TRAINING_FLAG)


def _finish_output(graph: fx.Graph, flat: list[Any]) -> list[Any]:
    """Make the output a flat tuple of unique tensor nodes; return per-leaf (index, None) or (None, constant)."""
    unique: list[fx.Node] = []
    leaves: list[Any] = []
    for item in flat:
        if isinstance(item, fx.Node):
            if item not in unique:
                unique.append(item)
            leaves.append((unique.index(item), None))
        else:
            leaves.append((None, item))
    graph.output(tuple(unique))
    return leaves


def unflattener(out_leaves: list[Any], out_spec: pytree.TreeSpec) -> Callable[[Sequence[torch.Tensor]], Any]:
    def unflatten(flat: Sequence[torch.Tensor]) -> Any:
        values = [flat[i] if i is not None else const for i, const in out_leaves]
        return pytree.tree_unflatten(values, out_spec)

    return unflatten


def fetch(module: nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target`` of ``module``."""
    obj: Any = module
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def tree(entries: dict[str, Any]) -> nn.Module:
    """A module hierarchy holding each value at its dotted path, registered in the given order
    (so a stage's ``named_parameters()`` follows the original model's order)."""
    root = nn.Module()
    for target, value in entries.items():
        *path, leaf = target.split(".")
        owner = root
        for atom in path:
            if atom not in owner._modules:
                owner.add_module(atom, nn.Module())
            owner = getattr(owner, atom)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        elif isinstance(value, torch.Tensor):
            owner.register_buffer(leaf, value)
        else:
            owner.add_module(leaf, value)
    return root


def build_module(model: nn.Module, graph: fx.Graph, constants: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A GraphModule over ``graph`` holding the original model's tensors and submodules."""
    root: dict[str, Any] = {TRAINING_FLAG: TrainingFlag()}
    for node in graph.nodes:
        if node.op == "get_attr":
            root[node.target] = constants[node.target] if node.target in constants else fetch(model, node.target)
        elif node.op == "call_module" and node.target != TRAINING_FLAG:
            root[node.target] = model.get_submodule(node.target)
    gm = fx.GraphModule(tree(root), graph, class_name=type(model).__name__ + "Graph")
    gm.graph.eliminate_dead_code(lambda n: n.is_impure() or bool(mutated_args(n)))  # keep in-place updates
    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    return gm
