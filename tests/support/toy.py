"""A toy model cut into stages by hand, and a valid program for any placement.

The toy has a tied "embedding"/head weight (shared by the first and last stage), a skip connection carried
through the middle stages, and reads the model input again in the last stage: the contract's hard cases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitpipe_fx.passes.stages import SplitModel, StageSpec
from bitpipe_fx.schedules.build import assemble
from bitpipe_fx.schedules.ir import Action, Placement, Program


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.lin(h))


class Toy(nn.Module):
    """x (b, vocab) -> logits (b, vocab); emb.weight is tied to the head."""

    def __init__(self, depth: int, width: int = 6, vocab: int = 5) -> None:
        super().__init__()
        self.emb = nn.Linear(vocab, width, bias=False)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head_bias = nn.Parameter(torch.linspace(-0.1, 0.1, vocab))

    def forward(self, x):
        h0 = self.emb(x)
        h = h0
        for b in self.blocks:
            h = b(h)
        return F.linear(h + h0, self.emb.weight.t(), self.head_bias) + 0.5 * x


class _Stage(nn.Module):
    def __init__(self, model: Toy, lo: int, hi: int, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        if first or last:
            self.emb = model.emb
        self.blocks = nn.Module()
        for i in range(lo, hi):
            self.blocks.add_module(str(i), model.blocks[i])
        if last:
            self.head_bias = model.head_bias

    def forward(self, *vals):
        if self.first:
            x = vals[0]
            h = h0 = self.emb(x)
            rest = vals[1:]
        else:
            x, h, h0 = (vals[0], *vals[1:]) if self.last else (None, *vals)
            rest = ()
        assert not rest
        for b in self.blocks.children():
            h = b(h)
        if self.last:
            return (F.linear(h + h0, self.emb.weight.t(), self.head_bias) + 0.5 * x,)
        return (h, h0)


def toy_split(model: Toy, stages: int) -> SplitModel:
    """Cut ``model`` into ``stages`` stages (depth must be a multiple of stages)."""
    per = len(model.blocks) // stages
    mods, specs = [], []
    for k in range(stages):
        first, last = k == 0, k == stages - 1
        mod = _Stage(model, k * per, (k + 1) * per, first, last)
        model_inputs = ("x",) if first or last else ()
        inputs = () if first else ("h", "h0")
        outputs = ("logits",) if last else ("h", "h0")
        params = tuple(n for n, _ in mod.named_parameters())
        mods.append(mod)
        specs.append(StageSpec(k, model_inputs, inputs, outputs, params))
    shared = {"emb.weight": (0, stages - 1)} if stages > 1 else {}
    return SplitModel(mods, tuple(specs), ("x",), lambda a, kw: [a[0] if a else kw["x"]], lambda o: o[0], shared)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The toy's loss."""
    return ((out - y) ** 2).mean()


def naive_program(placement: Placement, pipe_of: tuple[int, ...], split_backward: bool = False,
                  name: str = "naive") -> Program:
    """A valid program for any placement: forwards by (micro-batch, stage), then backwards by
    (micro-batch, -stage); with ``split_backward`` each B becomes I, and every W runs at the end."""
    D, S = placement.devices, placement.stages
    per_device: list[list[Action]] = [[] for _ in range(D)]
    for m, p in enumerate(pipe_of):
        for s in range(S):
            per_device[placement.device(p, s)].append(Action("F", p, s, m))
    for m, p in enumerate(pipe_of):
        for s in reversed(range(S)):
            per_device[placement.device(p, s)].append(Action("I" if split_backward else "B", p, s, m))
    if split_backward:
        for m, p in enumerate(pipe_of):
            for s in reversed(range(S)):
                per_device[placement.device(p, s)].append(Action("W", p, s, m))
    return assemble(name, placement, pipe_of, per_device)
