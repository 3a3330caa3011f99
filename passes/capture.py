"""capture: one micro-batch's example inputs -> a flat ``torch.fx.GraphModule`` with the original FQNs.

The captured graph is normalised so that every later pass sees one shape of graph:

- placeholders are the model's flat tensor inputs (``input_names``), in pytree order of ``(args, kwargs)``;
- parameters and buffers are read by ``get_attr`` nodes whose targets are the original, canonical FQNs
  (for a tied parameter, the name ``model.named_parameters()`` reports; every alias is in ``tied``);
- the output node returns a flat tuple of tensors; ``unflatten_output`` rebuilds the model's own output
  structure (tensor, tuple, dict, or a Hugging Face ``ModelOutput``) from it.

Train/eval: the model is captured in train mode (so dropout is in the graph), and every dropout (aten
dropout ops, and the ``dropout_p`` of scaled dot-product attention) reads its ``training`` flag from the
stage module at run time (a ``TrainingFlag`` submodule), so ``stage.eval()`` really turns dropout off.
Other mode-dependent code (e.g. batch-norm statistics) is frozen in train mode.
Graphs from ``torch.export`` are specialised to the example micro-batch's shapes.
"""

from __future__ import annotations

import inspect as pyinspect
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from bitpipe_fx.errors import ConfigError, TraceError

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
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def is_free(node: fx.Node) -> bool:
    """Nodes that compute nothing and are recreated in every stage that reads them (state, mode flag)."""
    return node.op == "get_attr" or (node.op == "call_module" and node.target == TRAINING_FLAG)


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

    ``leaf_modules`` (FQNs or classes) are kept as opaque calls by the torch.fx fallback: the fix for a
    submodule with data-dependent control flow. Raises TraceError when neither tracer succeeds.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"capture needs an nn.Module, got {type(model).__name__}")
    missing = [x for x in leaf_modules if isinstance(x, str) and x not in dict(model.named_modules())]
    if missing:
        raise ConfigError(f"leaf_modules names {missing}, which are not submodules of {type(model).__name__}")
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})
    was_training = model.training
    model.train()
    try:
        errors: list[tuple[str, BaseException]] = []
        if not leaf_modules:
            try:
                return _from_export(model, args, kwargs, was_training)
            except Exception as exc:
                errors.append(("torch.export.export(strict=False)", exc))
        try:
            return _from_symbolic_trace(model, args, kwargs, was_training, leaf_modules)
        except Exception as exc:
            errors.append(("torch.fx.symbolic_trace", exc))
        raise _trace_error(model, errors) from errors[-1][1]
    finally:
        model.train(was_training)


# ---- torch.export path -------------------------------------------------------------------------


def _from_export(model: nn.Module, args: tuple, kwargs: dict, training: bool) -> Captured:
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
    graph, out_leaves, constants = _rebuild(model, unlifted, env, [n for n, _ in inputs])

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
        graph_module=_module(model, graph, constants),
        model=model,
        method="export",
        input_names=tuple(n for n, _ in inputs),
        example_inputs=tuple(t for _, t in inputs),
        tied=tied_names(model)[1],
        constants=constants,
        training=training,
        _flatten=flatten,
        _unflatten=_unflattener(out_leaves, out_spec),
    )


def _rebuild(
    model: nn.Module, source: fx.GraphModule, env: dict[fx.Node, Any], input_names: list[str]
) -> tuple[fx.Graph, list[Any], dict[str, torch.Tensor]]:
    """Copy ``source``'s graph into the normal form (see the module docstring)."""
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
                value = _fetch(source, target)
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
    elif node.target is torch.ops.aten.scaled_dot_product_attention.default:
        p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        if isinstance(p, (int, float)) and p > 0:
            with graph.inserting_before(node):
                value = graph.call_function(train_value, (_training_flag(graph, node), float(p), 0.0))
            if "dropout_p" in node.kwargs:
                node.kwargs = {**node.kwargs, "dropout_p": value}
            else:
                node.args = (*node.args[:4], value, *node.args[5:])


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


def _unflattener(out_leaves: list[Any], out_spec: pytree.TreeSpec) -> Callable[[Sequence[torch.Tensor]], Any]:
    def unflatten(flat: Sequence[torch.Tensor]) -> Any:
        values = [flat[i] if i is not None else const for i, const in out_leaves]
        return pytree.tree_unflatten(values, out_spec)

    return unflatten


def _fetch(module: nn.Module, target: str) -> Any:
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


def _module(model: nn.Module, graph: fx.Graph, constants: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A GraphModule over ``graph`` holding the original model's tensors and submodules."""
    root: dict[str, Any] = {TRAINING_FLAG: TrainingFlag()}
    for node in graph.nodes:
        if node.op == "get_attr":
            root[node.target] = constants[node.target] if node.target in constants else _fetch(model, node.target)
        elif node.op == "call_module" and node.target != TRAINING_FLAG:
            root[node.target] = model.get_submodule(node.target)
    gm = fx.GraphModule(tree(root), graph, class_name=type(model).__name__ + "Graph")
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.train(model.training)
    return gm


# ---- torch.fx.symbolic_trace fallback ----------------------------------------------------------


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


def _from_symbolic_trace(
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
    graph, out_leaves, constants = _rebuild(model, source, env, tensor_params)
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
        graph_module=_module(model, graph, constants),
        model=model,
        method="symbolic_trace",
        input_names=names,
        example_inputs=tuple(bound.arguments[k] for k in names),
        tied=tied,
        constants=constants,
        training=training,
        _flatten=flatten,
        _unflatten=_unflattener(out_leaves, out_spec),
    )


def _drop_unused_placeholders(graph: fx.Graph, keep: list[str]) -> None:
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.name not in keep and not node.users:
            graph.erase_node(node)


# ---- errors ------------------------------------------------------------------------------------

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_frame(exc: BaseException) -> str:
    """'file:line in func: code' of the innermost frame of the user's code in ``exc``'s traceback."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith((_TORCH_DIR, _OWN_DIR, "<")) and "site-packages/torch" not in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def _trace_error(model: nn.Module, errors: list[tuple[str, BaseException]]) -> TraceError:
    name = type(model).__name__
    text = " ".join(str(e) for _, e in errors)
    lines = [f"could not capture {name} as a graph."]
    for how, exc in errors:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        where = _user_frame(exc)
        lines.append(f"  {how} failed: {type(exc).__name__}: {first}" + (f"\n    at {where}" if where else ""))
    lowered = text.lower()
    config = getattr(model, "config", None)
    if "cache" in lowered or "past_key_values" in lowered or getattr(config, "use_cache", False):
        lines.append(
            "Construct: a key/value cache (Hugging Face `use_cache=True`). "
            "Fix: build the model with `config.use_cache = False` (training does not need the cache)."
        )
    if any(
        key in lowered
        for key in ("data-dependent", "data dependent", "control flow", "guardondatadependent", "symbolic boolean")
    ):
        lines.append(
            "Construct: data-dependent Python control flow (an `if`/`while`/`bool()` or `.item()` on a tensor's "
            "value). Fix: compute it with tensor ops (torch.where, torch.cond), or mark the submodule that holds it "
            "as a leaf: capture(model, inputs, leaf_modules=['path.to.submodule']) keeps it as one opaque call."
        )
    elif len(lines) == 1 + len(errors):
        lines.append(
            "Fix: make forward traceable by torch.export (see the first error), or mark the offending submodule "
            "as a leaf with leaf_modules=['path.to.submodule']."
        )
    return TraceError("\n".join(lines))
