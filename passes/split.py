"""split: cut a captured graph at a partition's boundaries into S runnable stage modules.

Stage k's graph reads the model inputs it needs directly (``model_inputs``), receives the values stage k-1
sends (``inputs``: everything produced earlier and still needed at k or later, so values that skip stages are
carried through), and returns what later stages need (``outputs``); the last stage returns the model's flat
outputs. Each stage holds exactly the parameters and buffers its nodes read, under their original canonical
FQNs, as the SAME tensor objects as the original model (no copies; tied and shared parameters are therefore one
tensor in every stage that reads them, listed in ``SplitModel.shared``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import fx, nn

from bitpipe_fx.errors import PartitionError
from bitpipe_fx.passes.graph_form import TRAINING_FLAG, Captured, TrainingFlag, compute_nodes, fetch, is_free, tree
from bitpipe_fx.passes.input_uses import index_ranges, mutated_inputs
from bitpipe_fx.passes.stages import RunningStat, SplitModel, StageSpec


def split(captured: Captured, partition: Any) -> SplitModel:
    """Build the stages for ``partition`` (a Partition, or its cut positions: S-1 increasing integers)."""
    cuts = tuple(getattr(partition, "cuts", partition))
    nodes = compute_nodes(captured.graph)
    bounds = (0, *cuts, len(nodes))
    if any(b <= a for a, b in pairwise(bounds)):
        raise PartitionError(
            f"cut positions {list(cuts)} must increase strictly within 1..{len(nodes) - 1} "
            f"(the graph has {len(nodes)} nodes)"
        )
    num_stages = len(bounds) - 1
    stage_of = {n: k for k in range(num_stages) for n in nodes[bounds[k] : bounds[k + 1]]}
    output_node = next(n for n in captured.graph.nodes if n.op == "output")
    final_outputs: tuple[fx.Node, ...] = tuple(output_node.args[0])

    # last stage that needs each computed value (the model's outputs are needed by the last stage)
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        users = [stage_of[u] for u in node.users if u in stage_of]
        if node in final_outputs:
            users.append(num_stages - 1)
        last_use[node] = max(users, default=stage_of[node])

    specs: list[StageSpec] = []
    stages: list[nn.Module] = []
    carried_in: list[fx.Node] = []
    for k in range(num_stages):
        own = nodes[bounds[k] : bounds[k + 1]]
        if k == num_stages - 1:
            outputs = list(final_outputs)
        else:
            live = [*carried_in, *own]
            outputs = [n for n in live if last_use[n] > k]
            for node in outputs:
                val = node.meta.get("val")
                if val is not None and not isinstance(val, torch.Tensor):
                    raise PartitionError(
                        f"value {node.name!r} ({type(val).__name__}, not a tensor) would cross the boundary after "
                        f"stage {k}; cut where only tensors are live (CostTable.cuttable)"
                    )
        stage, spec = _build_stage(captured, k, own, carried_in, outputs)
        stages.append(stage)
        specs.append(spec)
        carried_in = [n for n in outputs if n.op != "placeholder" and not is_free(n)]

    users_of: dict[str, list[int]] = {}
    for spec in specs:
        for name in spec.params:
            users_of.setdefault(name, []).append(spec.index)
    shared = {name: tuple(ks) for name, ks in users_of.items() if len(ks) > 1}
    unused = tuple(name for name, _ in captured.model.named_parameters() if name not in users_of)
    keep_idle_state(stages[0], captured.model, stages)
    return SplitModel(
        stages=stages,
        specs=tuple(specs),
        input_names=captured.input_names,
        flatten_inputs=lambda args, kwargs=None: captured.flatten_inputs(args, kwargs),
        unflatten_output=captured.unflatten_output,
        shared=shared,
        unused=unused,
        index_ranges=index_ranges(captured),
    )


def keep_idle_state(first: nn.Module, model: nn.Module, stages: Sequence[nn.Module]) -> None:
    """Parameters and buffers no stage reads stay in the model's state: ``first`` holds them under their FQNs
    (same tensors, same requires_grad, same persistence), so state dicts, checkpoints and exports keep them."""
    held = {name for stage in stages for name, _ in (*stage.named_parameters(), *stage.named_buffers())}
    persistent = set(model.state_dict())
    for name, value in (*model.named_parameters(), *model.named_buffers()):
        if name in held:
            continue
        *path, leaf = name.split(".")
        owner = first
        for atom in path:
            if atom not in owner._modules:
                owner.add_module(atom, nn.Module())
            owner = owner.get_submodule(atom)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value, persistent=name in persistent)


def run_stages(split_model: SplitModel, args: tuple, kwargs: dict | None = None) -> Any:
    """Run the stages one after another in this process (debugging, tests); returns the model's output."""
    flat = split_model.flatten_inputs(tuple(args), dict(kwargs or {}))
    model_inputs = dict(zip(split_model.input_names, flat))
    carried: tuple = ()
    for stage, spec in zip(split_model.stages, split_model.specs):
        carried = stage(*(model_inputs[n] for n in spec.model_inputs), *carried)
    return split_model.unflatten_output(carried)


def _build_stage(
    captured: Captured, index: int, own: Sequence[fx.Node], received: Sequence[fx.Node], outputs: Sequence[fx.Node]
) -> tuple[fx.GraphModule, StageSpec]:
    model = captured.model
    reads = {a for n in own for a in n.all_input_nodes} | set(outputs)
    placeholders = [n for n in captured.graph.nodes if n.op == "placeholder" and n in reads]
    state = _state_order(model, captured, {n.target for n in reads if n.op == "get_attr"})

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in placeholders:
        env[node] = graph.placeholder(node.name)
    for node in received:
        env[node] = graph.placeholder(node.name)
    for node in mutated_inputs(own) & set(placeholders):  # updated in place: on a copy (passes/input_uses.py)
        env[node] = graph.call_function(torch.ops.aten.clone.default, (env[node],))
    attrs = {target: graph.get_attr(target) for target in state}
    flag: list[fx.Node] = []

    def lookup(node: fx.Node) -> fx.Node:
        if node.op == "get_attr":
            return attrs[node.target]
        if is_free(node):
            if not flag:
                flag.append(graph.call_module(TRAINING_FLAG))
            return flag[0]
        return env[node]

    for node in own:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(n) for n in outputs))
    graph.lint()

    root: dict[str, Any] = {TRAINING_FLAG: TrainingFlag()}
    for target in state:
        root[target] = captured.constants[target] if target in captured.constants else fetch(model, target)
    submodules = [n.target for n in own if n.op == "call_module" and n.target != TRAINING_FLAG]
    for target in submodules:
        root[target] = model.get_submodule(target)
    stage = fx.GraphModule(tree(root), graph, class_name=f"Stage{index}")
    _restore_buffer_persistence(stage, model, captured)
    stage.train(captured.training)

    params = tuple(name for name, _ in stage.named_parameters())
    buffers = tuple(name for name, _ in stage.named_buffers() if name not in captured.constants)
    spec = StageSpec(
        index=index,
        model_inputs=tuple(n.name for n in placeholders),
        inputs=tuple(n.name for n in received),
        outputs=tuple(n.name for n in outputs),
        params=params,
        buffers=buffers,
        running_stats=running_stats(own, set(buffers)),
    )
    return stage, spec


def running_stats(nodes: list[fx.Node], buffers: set[str]) -> tuple[RunningStat, ...]:
    """The batch norms among ``nodes`` whose running mean and variance are buffers of the stage."""
    out = []
    for node in nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        mean, var, momentum = node.args[3], node.args[4], node.args[6]
        if not all(isinstance(v, fx.Node) and v.op == "get_attr" and v.target in buffers for v in (mean, var)):
            continue
        tracked = str(mean.target).rpartition(".")[0] + ".num_batches_tracked"
        tracked = tracked.lstrip(".")
        out.append(RunningStat(str(mean.target), str(var.target), tracked if tracked in buffers else None,
                               float(momentum)))
    return tuple(out)


def _state_order(model: nn.Module, captured: Captured, targets: set[str]) -> list[str]:
    """The get_attr targets in the original model's order (parameters, buffers, then constants)."""
    order = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    known = [t for t in order if t in targets]
    return known + sorted(t for t in targets if t not in set(known))


def _restore_buffer_persistence(stage: nn.Module, model: nn.Module, captured: Captured) -> None:
    """GraphModule registers every tensor as a persistent buffer; mirror the original's non-persistent ones."""
    non_persistent = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    }
    non_persistent |= set(captured.constants)
    for prefix, module in stage.named_modules():
        for name in list(module._buffers):
            if (f"{prefix}.{name}" if prefix else name) in non_persistent:
                module._non_persistent_buffers_set.add(name)
