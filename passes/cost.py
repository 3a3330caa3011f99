"""cost: per-node FLOPs, parameter bytes and activation bytes of a captured graph, by shape propagation.

Shapes come from running the graph once on FakeTensors (no real compute, no memory), falling back to the
real example inputs when a node cannot run on fake tensors (e.g. an opaque leaf module with data-dependent
control flow). FLOPs of matmul, linear, convolution and attention come from ``torch.utils.flop_counter``; any
other op that computes (elementwise, reductions, normalisation, gathers) counts one FLOP per output element;
views count zero. The tensors autograd saves come from passes/saved.py, per stage with each tensor once. The
same table feeds the partitioner (loads, bytes crossing each cut) and, through the plan, the simulator's
cost model and the memory model (sim/memory.py).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from bitpipe_fx.passes.graph_form import TRAINING_FLAG, Captured, buffers_kept, compute_nodes, mutated_args
from bitpipe_fx.passes.saved import SavedValue, saved_values


@dataclass(frozen=True)
class NodeCost:
    """What one compute node costs for one micro-batch."""

    name: str
    target: str
    flops: int  # forward FLOPs
    out_bytes: int  # bytes of its output tensor(s): what a send of this value moves
    activation_bytes: int  # out_bytes, or 0 when the output aliases an input (views)
    state: tuple[str, ...]  # FQNs of the parameters and buffers it reads directly
    is_tensor: bool  # its output is a single tensor (only such values may cross a stage boundary)
    weight_grad_bytes: int = 0  # out_bytes when it reads a parameter: the output gradient a deferred W needs


@dataclass(frozen=True)
class StageCost:
    """Totals of one stage for one micro-batch (a row of the plan's summary)."""

    index: int
    nodes: int
    params: int  # parameter elements
    param_bytes: int
    flops: int  # forward FLOPs
    activation_bytes: int  # bytes of the values the stage computes (what it stashes for backward, roughly)
    bytes_sent: int  # bytes it sends to the next stage (0 for the last stage)
    first_node: str
    last_node: str
    saved_bytes: int = 0  # bytes autograd saves for one micro-batch's backward (passes/saved.py; weights excluded)
    weight_grad_bytes: int = 0  # output gradients an I keeps for its W (nodes with weights, plus the stage's outputs)
    input_bytes: int = 0  # bytes the stage receives per micro-batch (what a recomputed stage keeps from F to B/I)


@dataclass(frozen=True)
class CostTable:
    """Costs of every compute node in topological order, and of every boundary between two nodes.

    Boundary ``b`` (1 <= b < len(nodes)) lies between node b-1 and node b; index b-1 of ``crossing_bytes``
    and ``cuttable`` describes it.
    """

    nodes: tuple[NodeCost, ...]
    param_bytes: dict[str, int]  # parameter FQN -> bytes
    param_numel: dict[str, int]  # parameter FQN -> elements
    crossing_bytes: tuple[int, ...]  # bytes of the values live across each boundary
    cuttable: tuple[bool, ...]  # False where a non-tensor value or an in-place update would cross
    saved: tuple[SavedValue, ...] = ()  # tensors autograd saves in one forward, with the nodes saving them
    output_bytes: int = 0  # bytes of the model's outputs: what the loss keeps for its backward (log-softmax's)

    @property
    def flops(self) -> list[int]:
        return [n.flops for n in self.nodes]

    def stages(self, cuts: Sequence[int]) -> tuple[StageCost, ...]:
        """Per-stage totals for the stages that ``cuts`` (boundary positions) delimit."""
        bounds = (0, *cuts, len(self.nodes))
        rows = []
        for k in range(len(bounds) - 1):
            own = self.nodes[bounds[k] : bounds[k + 1]]
            params = sorted({s for n in own for s in n.state if s in self.param_bytes})
            last = k == len(bounds) - 2
            sent = 0 if last else self.crossing_bytes[bounds[k + 1] - 1]
            received = self.crossing_bytes[bounds[k] - 1] if k > 0 else 0
            rows.append(
                StageCost(
                    index=k,
                    nodes=len(own),
                    params=sum(self.param_numel[p] for p in params),
                    param_bytes=sum(self.param_bytes[p] for p in params),
                    flops=sum(n.flops for n in own),
                    activation_bytes=sum(n.activation_bytes for n in own),
                    bytes_sent=sent,
                    first_node=own[0].name,
                    last_node=own[-1].name,
                    saved_bytes=self._saved_in(bounds[k], bounds[k + 1]) + (self.output_bytes if last else 0),
                    # a stage without inputs to differentiate leaves its whole backward to W (runtime/chunk.py)
                    weight_grad_bytes=sent + (sum(n.weight_grad_bytes for n in own) if received else 0),
                    input_bytes=received,
                )
            )
        return tuple(rows)

    def _saved_in(self, start: int, end: int) -> int:
        """Bytes of the saved tensors that some node in positions [start, end) saves (each counted once)."""
        return sum(v.nbytes for v in self.saved if any(start <= i < end for i in v.savers))


def estimate_costs(captured: Captured) -> CostTable:
    """Annotate every compute node of ``captured`` with FLOPs and bytes (see the module docstring)."""
    model = captured.model
    params = dict(model.named_parameters())
    state_names = set(params) | {n for n, _ in model.named_buffers()}
    nodes = compute_nodes(captured.graph)
    values, flops = _propagate(captured)
    position = {n: i for i, n in enumerate(nodes)}
    costs = []
    for node in nodes:
        out = values[node]
        out_bytes = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        view = _is_view(node)
        counted = flops[node] or _attention_flops(node, values)
        if counted == 0 and not view and isinstance(out, torch.Tensor):
            counted = out.numel()
        state = _state_read(node, captured, state_names)
        costs.append(
            NodeCost(
                name=node.name,
                target=_target_name(node),
                flops=int(counted),
                out_bytes=int(out_bytes),
                activation_bytes=0 if view else int(out_bytes),
                state=state,
                is_tensor=isinstance(out, torch.Tensor),
                weight_grad_bytes=int(out_bytes) if not view and any(n in params for n in state) else 0,
            )
        )
    crossing, cuttable = _boundaries(captured.graph, nodes, position, costs)
    return CostTable(
        nodes=tuple(costs),
        param_bytes={k: p.numel() * p.element_size() for k, p in params.items()},
        param_numel={k: p.numel() for k, p in params.items()},
        crossing_bytes=crossing,
        cuttable=cuttable,
        saved=saved_values(captured),
        output_bytes=sum(costs[position[n]].out_bytes for n in _output_node(captured.graph).all_input_nodes
                         if n in position),
    )


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "output")


class _Propagate(fx.Interpreter):
    """Runs the graph once, keeping each node's output (shape carrier) and counted FLOPs.

    Each distinct aten call (op, argument structure, tensor shapes, dtypes and strides, other values) is
    counted once: a 96-layer model repeats one layer's few dozen calls. On fake tensors (``reuse``) a repeated
    call also takes the first one's output, which carries the same shapes, instead of running again, unless
    the op or a user of its output writes in place.
    """

    def __init__(self, gm: fx.GraphModule, reuse: bool) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.flops: dict[fx.Node, int] = {}
        self.known: dict[tuple, tuple[int, Any]] = {}  # signature -> (FLOPs, output when reusable, else None)
        self.reuse = reuse

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr", "output") or n.target == TRAINING_FLAG:
            return super().run_node(n)
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            key = _signature(n, args, kwargs)
            reusable = self.reuse and key is not None and not _writes(n)
            if key in self.known:
                self.flops[n], out = self.known[key]
                if reusable and out is not None:
                    return out
                return getattr(self, n.op)(n.target, args, kwargs)
            with FlopCounterMode(display=False) as counter:
                out = getattr(self, n.op)(n.target, args, kwargs)
            self.flops[n] = counter.get_total_flops()
            if key is not None:
                self.known[key] = (self.flops[n], out if reusable else None)
            return out


def _writes(node: fx.Node) -> bool:
    """Whether ``node`` or a user of its output updates a value in place."""
    return bool(mutated_args(node)) or any(node in mutated_args(user) for user in node.users)


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _signature(node: fx.Node, args: tuple, kwargs: dict) -> tuple | None:
    """What an aten op's FLOPs depend on: the op, its argument structure, tensor shapes and dtypes, other
    values; None for anything else (modules, Python functions, values without a plain form)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    leaves, spec = pytree.tree_flatten((args, kwargs))
    key: list[object] = [node.target, str(spec)]
    for x in leaves:
        if isinstance(x, torch.Tensor):
            key.append((tuple(x.shape), x.dtype, tuple(x.stride())))
        elif isinstance(x, _PLAIN):
            key.append((type(x), x))
        else:
            return None
    return tuple(key)


def _propagate(captured: Captured) -> tuple[dict[fx.Node, Any], dict[fx.Node, int]]:
    interp = _Propagate(captured.graph_module, reuse=True)
    try:
        with torch.no_grad(), buffers_kept(captured.graph_module), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            interp.run(*(mode.from_tensor(t) for t in captured.example_inputs))
    except Exception:
        interp = _Propagate(captured.graph_module, reuse=False)
        with torch.no_grad(), buffers_kept(captured.graph_module):
            interp.run(*captured.example_inputs)
    return interp.env, interp.flops


def _attention_flops(node: fx.Node, values: dict[fx.Node, Any]) -> int:
    """FLOPs of scaled dot-product attention (Q·Kᵀ and P·V), which the flop counter misses on some backends."""
    if "scaled_dot_product" not in _target_name(node) or len(node.args) < 3:
        return 0
    q, k, v = (values.get(a) for a in node.args[:3])
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return 0
    batch = q.numel() // (q.shape[-2] * q.shape[-1])
    return 2 * batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _is_view(node: fx.Node) -> bool:
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return node.op == "call_method" and node.target in ("view", "reshape", "transpose", "permute", "unsqueeze")
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _state_read(node: fx.Node, captured: Captured, state_names: set[str]) -> tuple[str, ...]:
    if node.op == "call_module":
        module = captured.graph_module.get_submodule(str(node.target))
        named = [*module.named_parameters(prefix=str(node.target)), *module.named_buffers(prefix=str(node.target))]
        return tuple(name for name, _ in named)
    return tuple(a.target for a in node.all_input_nodes if a.op == "get_attr" and a.target in state_names)


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _boundaries(
    graph: fx.Graph, nodes: list[fx.Node], position: dict[fx.Node, int], costs: list[NodeCost]
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Bytes live across each boundary and whether a cut there is allowed."""
    m = len(nodes)
    delta = [0] * (m + 1)
    blocked = [0] * (m + 1)
    for i, node in enumerate(nodes):
        last = max((position.get(u, m) for u in node.users), default=i)  # the output node counts as m
        if last > i:
            delta[i + 1] += costs[i].out_bytes
            delta[last + 1 if last < m else m] -= costs[i].out_bytes
            if not costs[i].is_tensor:
                blocked[i + 1] += 1
                blocked[min(last, m - 1) + 1] -= 1
        for arg in mutated_args(node):
            if arg in position:  # an in-place update must stay with the value's producer
                blocked[position[arg] + 1] += 1
                blocked[i + 1] -= 1
            elif arg.op == "placeholder":  # ... and a model input's, with its later reads (passes/input_uses.py)
                later = max((position.get(u, m) for u in arg.users if position.get(u, m) > i), default=i)
                if later > i:
                    blocked[i + 1] += 1
                    blocked[min(later, m - 1) + 1] -= 1
    crossing, cuttable, live, block = [], [], 0, 0
    for b in range(1, m):
        live += delta[b]
        block += blocked[b]
        crossing.append(live)
        cuttable.append(block == 0)
    return tuple(crossing), tuple(cuttable)
