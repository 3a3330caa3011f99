"""FLOPs and output sizes counted once per distinct aten call are those of counting every node on its own."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from bitpipe_fx.examples.models import bert, gpt
from bitpipe_fx.passes import capture, estimate_costs
from bitpipe_fx.passes.graph_form import TRAINING_FLAG, buffers_kept, compute_nodes


class _EveryNode(fx.Interpreter):
    """The reference: every node runs on fake tensors under its own flop counter."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.flops: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr", "output") or n.target == TRAINING_FLAG:
            return super().run_node(n)
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        self.flops[n] = counter.get_total_flops()
        return out


def _per_node(captured) -> list[tuple[str, int, int]]:
    interp = _EveryNode(captured.graph_module)
    with torch.no_grad(), buffers_kept(captured.graph_module), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        interp.run(*(mode.from_tensor(t) for t in captured.example_inputs))
    out = []
    for node in compute_nodes(captured.graph):
        value = interp.env[node]
        nbytes = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor))
        out.append((node.name, interp.flops[node], nbytes))
    return out


def test_memoised_counts_equal_counting_every_node():
    for model, inputs in (gpt(layers=6, dim=48, heads=3), bert(layers=3)):
        captured = capture(model, inputs)
        table = estimate_costs(captured)
        reference = _per_node(captured)
        assert len(table.nodes) == len(reference)
        for node, (name, flops, nbytes) in zip(table.nodes, reference):
            assert node.name == name and node.out_bytes == nbytes
            if flops:  # where the counter finds none, the elementwise / attention rule applies, memo or not
                assert node.flops == flops
        counted = [n.target for n in table.nodes if n.flops]
        assert len(set(counted)) < len(counted)  # repeated calls: the memo was used
