"""predict(): the model's outputs for the whole batch, as the unpipelined model returns them (float64,
<= 1e-12), for tensor, tuple, dict and Hugging Face outputs under every schedule family (local executor)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bitpipe_fx as bp
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from bitpipe_fx.schedules import SCHEDULES
from tests.support.reference import max_rel_err

FAMILIES = sorted(SCHEDULES)


class Tower(nn.Module):
    """Eight tanh layers with dropout; returns a tuple or a dict of batch-first tensors and a 0-d mean."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(8))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor):
        h = x
        for layer in self.layers:
            h = torch.tanh(layer(self.drop(h)))
        if self.kind == "tuple":
            return h, h.sum(-1)
        return {"out": h, "score": h.sum(-1), "mean": h.mean()}


def _tower_loss(out, y):
    return ((out[0] if isinstance(out, tuple) else out["out"]) - y).pow(2).mean()


def _case(kind: str):
    """(model, one micro-batch, loss, batch inputs, targets, reference outputs per micro-batch-join rule)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "tensor":
            model, example = gpt()
            model = model.double()
            tokens, targets = lm_batch(128, 8, 16, seed=2)
            return model, example, lm_loss, tokens, targets
        if kind == "hf":
            transformers = pytest.importorskip("transformers")
            cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=4, n_head=2,
                                          use_cache=False)  # dropout 0.1: predict must switch it off
            model = transformers.GPT2LMHeadModel(cfg).double()
            tokens, targets = lm_batch(96, 8, 12, seed=2)
            return model, (tokens[:2],), lm_loss, tokens, targets
        model = Tower(kind).double()
        x = torch.randn(8, 6, dtype=torch.float64)
        return model, (x[:2],), _tower_loss, x, torch.zeros(8, 6, dtype=torch.float64)


def _close(got, want) -> bool:
    if isinstance(want, torch.Tensor):
        return got.shape == want.shape and max_rel_err(got, want) <= 1e-12
    if isinstance(want, dict) or hasattr(want, "keys"):
        return set(got.keys()) == set(want.keys()) and all(_close(got[k], want[k]) for k in want)
    return type(got) is type(want) and len(got) == len(want) and all(_close(a, b) for a, b in zip(got, want))


def _reference(kind: str, model: nn.Module, inputs: torch.Tensor):
    """The unpipelined model's outputs in eval mode (a 0-d output: the mean over the 4 micro-batches)."""
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        want = ref(inputs)
        if kind == "dict":  # equal weights: the batch's mean, computed the way predict documents it
            want["mean"] = torch.stack([ref(x)["mean"] for x in inputs.tensor_split(4)]).mean()
    return want


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "hf"])
def test_predict_equals_the_unpipelined_model_under_every_family(kind):
    model, example, loss_fn, inputs, _ = _case(kind)
    want = _reference(kind, model, inputs)
    for family in FAMILIES:
        pipe = bp.compile(model, example, loss_fn, schedule=family, devices=2, microbatches=4)
        got = pipe.predict(inputs)
        assert type(got) is type(want), family
        assert _close(got, want), family
        assert pipe.training  # the stage modules are back in train mode


def test_predict_uses_the_trained_weights():
    model, example, loss_fn, tokens, targets = _case("tensor")
    pipe = bp.compile(model, example, loss_fn, schedule="bitpipe", devices=2, microbatches=4,
                      optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    before = pipe.predict(tokens)
    pipe.step(tokens, targets)
    trained = pipe.load_into(copy.deepcopy(model)).eval()
    with torch.no_grad():
        want = trained(tokens)
    got = pipe.predict(tokens)
    assert max_rel_err(got, want) <= 1e-12 and not torch.allclose(got, before)


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.t()


def test_outputs_that_are_not_batch_first_are_refused():
    pipe = bp.compile(Transposed().double(), (torch.zeros(2, 6, dtype=torch.float64),),
                      lambda out, y: out.sum(), schedule="1f1b", devices=2, microbatches=4)
    with pytest.raises(ConfigError, match=r"model output 0 has shape \(6, 2\) per micro-batch, neither 0-d nor "
                                          r"2 rows along dim 0"):
        pipe.predict(torch.zeros(8, 6, dtype=torch.float64))


def _dist_worker(export_path: str) -> dict:
    """One rank at D=2: predict vs the unpipelined model for every output kind, and export/load_into."""
    import torch.distributed as dist

    errors = {}
    for kind, family in (("tuple", "bitpipe"), ("dict", "1f1b"), ("hf", "zbv"), ("tensor", "chimera")):
        model, example, loss_fn, inputs, _ = _case(kind)
        want = _reference(kind, model, inputs)
        pipe = bp.compile(model, example, loss_fn, schedule=family, devices=2, microbatches=4)
        got = pipe.predict(inputs)
        errors[kind] = type(got) is type(want) and _close(got, want)
    model, example, loss_fn, tokens, targets = _case("tensor")
    fresh = copy.deepcopy(model)
    pipe = bp.compile(model, example, loss_fn, schedule="bitpipe", devices=2, microbatches=4,
                      optimizer=lambda ps: bp.optim.ScheduleFreeSGD(ps, lr=0.05))
    pipe.train()
    pipe.step(tokens, targets)
    written = pipe.export(export_path)
    loaded = pipe.load_into(copy.deepcopy(fresh))
    dist.barrier()
    exported = bp.export.load(export_path)
    same = set(exported) == set(loaded.state_dict()) and all(
        torch.equal(v, exported[k]) for k, v in loaded.state_dict().items())
    return {"predict": errors, "written": written is not None, "same": same}


@pytest.mark.dist
def test_predict_and_export_at_two_processes(tmp_path):
    from bitpipe_fx.runtime.launch import launch

    path = str(tmp_path / "m.safetensors")
    results = launch(_dist_worker, 2, args=(path,), timeout=120, join_timeout=300)
    for rank, r in enumerate(results):
        assert r["predict"] == {"tuple": True, "dict": True, "hf": True, "tensor": True}, rank
        assert r["same"], rank
    assert [r["written"] for r in results] == [True, False]  # rank 0 writes the gathered file
