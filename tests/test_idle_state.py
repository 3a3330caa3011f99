"""Unused and frozen parameters (and unused buffers) stay in every state dict, checkpoint and export;
frozen and unused ones are not given to the optimizer and never change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitpipe_fx.api import compile as bp_compile


class Partly(nn.Module):
    """A frozen first layer, an unused layer and buffer, and a trained rest."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 8).requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        self.spare = nn.Linear(3, 3)  # never called
        self.register_buffer("scale_unused", torch.arange(3.0))

    def forward(self, x):
        return self.body(self.frozen(x))


def _sq(out, y):
    return ((out - y) ** 2).mean()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model = Partly().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    given: list[nn.Parameter] = []

    def adamw(params):
        given.extend(params)
        return torch.optim.AdamW(params, lr=0.05, weight_decay=0.5)

    pipe = bp_compile(model, torch.zeros(2, 4, dtype=torch.float64), _sq, schedule="bitpipe", devices=2,
                      microbatches=4, optimizer=adamw)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        pipe.step(torch.randn(8, 4, generator=g, dtype=torch.float64),
                  torch.randn(8, 1, generator=g, dtype=torch.float64))
    root = tmp_path_factory.mktemp("idle")
    pipe.save_checkpoint(root / "ckpt")
    return {"model": model, "before": before, "pipe": pipe, "given": given, "root": root}


IDLE = ("frozen.weight", "frozen.bias", "spare.weight", "spare.bias", "scale_unused")


def test_every_state_dict_keeps_unused_and_frozen_tensors_unchanged(trained):
    pipe, before = trained["pipe"], trained["before"]
    full = pipe.full_state_dict()
    assert list(full) == list(before)
    assert sorted(pipe.state_dict()["model"]) == sorted(before)
    for name in IDLE:
        assert torch.equal(full[name], before[name]), name
    assert not torch.equal(full["body.0.weight"], before["body.0.weight"])  # the rest did train


def test_the_optimizer_gets_only_used_trainable_parameters(trained):
    names = {id(p): n for r in trained["pipe"].executor.replicas for n, p in r.params.items()}
    given = {names[id(p)] for p in trained["given"]}
    assert given == {f"body.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}


def test_checkpoint_and_export_keep_them(trained):
    pipe, before, root = trained["pipe"], trained["before"], trained["root"]
    torch.manual_seed(5)
    other = bp_compile(Partly().double(), torch.zeros(2, 4, dtype=torch.float64), _sq, schedule="1f1b",
                       devices=2, microbatches=4, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    other.load_checkpoint(root / "ckpt")
    loaded = other.full_state_dict()
    for name, value in pipe.full_state_dict().items():
        assert torch.equal(loaded[name], value), name
    from safetensors.torch import load_file  # optional dependency (the export extra)

    path = pipe.export(root / "model.safetensors", weights="train")
    exported = load_file(str(path))
    assert set(exported) == set(before)
    for name in IDLE:
        assert torch.equal(exported[name], before[name]), name
