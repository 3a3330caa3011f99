"""saved: which tensors autograd keeps for the backward of one micro-batch, and which nodes keep them.

The captured graph runs once with autograd on FakeTensors (no real compute or memory; the real example inputs
when a node cannot run on fake tensors) under ``torch.autograd.graph.saved_tensors_hooks``; every tensor a node
saves is attributed to that node and identified by its storage, so a value saved by several nodes counts once
per stage. Parameters and buffers are left out (they are counted as weights). The memory model
(bitpipe_fx.sim.memory) reads the per-stage totals through ``CostTable.stages``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from bitpipe_fx.passes.graph_form import Captured, buffers_kept, compute_nodes


@dataclass(frozen=True)
class SavedValue:
    """One stored tensor of a forward: its bytes and the positions (in compute-node order) of the nodes saving it."""

    nbytes: int
    savers: tuple[int, ...]


class _Recorder(fx.Interpreter):
    """Runs the graph with autograd, noting which node is running when a tensor is packed for backward."""

    def __init__(self, gm: fx.GraphModule, position: dict[fx.Node, int], mode: FakeTensorMode | None) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.position, self.current, self.mode = position, -1, mode
        self.state: set[StorageWeakRef] = set()
        self.saved: dict[StorageWeakRef, tuple[int, set[int]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.current = self.position.get(n, -1)
        out = super().run_node(n)
        if n.op == "get_attr" and isinstance(out, torch.Tensor):
            if self.mode is not None:
                out = self.mode.from_tensor(out)  # memoised: every use of the state is this one fake tensor
            self.state.add(StorageWeakRef(out.untyped_storage()))
        return out

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.current >= 0 and t.layout == torch.strided:
            key = StorageWeakRef(t.untyped_storage())
            if key not in self.state:
                _, savers = self.saved.setdefault(key, (t.untyped_storage().nbytes(), set()))
                savers.add(self.current)
        return t


def saved_values(captured: Captured) -> tuple[SavedValue, ...]:
    """Every non-state tensor autograd saves in one forward of ``captured``, with its saving nodes."""
    nodes = compute_nodes(captured.graph)
    position = {n: i for i, n in enumerate(nodes)}
    try:
        return _record(captured, position, fake=True)
    except Exception:  # a node that cannot run on fake tensors (e.g. data-dependent control flow)
        return _record(captured, position, fake=False)


def _record(captured: Captured, position: dict[fx.Node, int], fake: bool) -> tuple[SavedValue, ...]:
    gm = captured.graph_module
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    rec = _Recorder(gm, position, mode)
    with torch.enable_grad(), buffers_kept(gm), torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        if mode is None:
            rec.run(*captured.example_inputs)
        else:
            with mode:
                rec.run(*(mode.from_tensor(t) for t in captured.example_inputs))
    return tuple(SavedValue(nbytes, tuple(sorted(savers))) for nbytes, savers in rec.saved.values())
