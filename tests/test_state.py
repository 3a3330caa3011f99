"""Checkpoints by original FQN: resume bit-identically, gather the full model, refuse mismatched state."""

from __future__ import annotations

import io

import pytest
import torch

import bitpipe_fx as bp
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss


def adam(params):
    return torch.optim.Adam(params, lr=0.01)


def sf_adamw(params):
    schedulefree = pytest.importorskip("schedulefree")
    return schedulefree.AdamWScheduleFree(params, lr=0.01, warmup_steps=2)


def _batches(n: int):
    return [lm_batch(128, 8, 16, seed=100 + i) for i in range(n)]


def _round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("factory", [adam, sf_adamw], ids=["adam", "schedulefree-adamw"])
def test_resume_is_bit_identical(factory):
    batches = _batches(4)
    model, example = gpt()
    straight = bp.compile(model, example, lm_loss, schedule="bitpipe", devices=2, microbatches=4, optimizer=factory)
    for b in batches[:2]:
        straight.step(*b)
    saved = _round_trip(straight.state_dict())
    for b in batches[2:]:
        straight.step(*b)

    fresh_model, _ = gpt(seed=1)  # different initial weights: everything must come from the checkpoint
    resumed = bp.compile(fresh_model, example, lm_loss, schedule="bitpipe", devices=2, microbatches=4,
                         optimizer=factory)
    resumed.load_state_dict(saved)
    for b in batches[2:]:
        resumed.step(*b)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for fqn, st in a["optimizer"]["state"].items():
        for key, value in st.items():
            other = b["optimizer"]["state"][fqn][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_state_is_keyed_by_original_names():
    model, example = gpt()
    pipe = bp.compile(model, example, lm_loss, schedule="bitpipe", devices=2, microbatches=4, optimizer=adam)
    pipe.step(*_batches(1)[0])
    state = pipe.state_dict()
    names = {n for n, _ in model.named_parameters()}
    assert names <= set(state["model"])
    assert set(state["optimizer"]["state"]) == names
    (group,) = state["optimizer"]["param_groups"]
    assert sorted(group["params"]) == sorted(names) and group["lr"] == 0.01


def test_full_state_dict_loads_into_the_original_model():
    model, example = gpt()
    pipe = bp.compile(model, example, lm_loss, schedule="zbv", devices=2, microbatches=4, optimizer=adam)
    tokens, targets = _batches(1)[0]
    pipe.step(tokens, targets)
    full = pipe.full_state_dict()
    assert list(full) == list(model.state_dict())  # same keys, same order, tied alias head.weight included
    assert torch.equal(full["head.weight"], full["tok_emb.weight"])
    trained, _ = gpt(seed=3)
    trained.load_state_dict(full, strict=True)
    with torch.no_grad():
        ref = sum(float(lm_loss(trained(x), y)) for x, y in zip(tokens.tensor_split(4), targets.tensor_split(4))) / 4
    assert abs(pipe.evaluate(tokens, targets) - ref) <= 1e-6 * ref
    again = bp.compile(gpt(seed=4)[0], example, lm_loss, schedule="zbv", devices=2, microbatches=4)
    again.load_state_dict({"model": full})
    assert again.evaluate(tokens, targets) == pipe.evaluate(tokens, targets)


def test_mismatched_state_is_refused():
    model, example = gpt()
    pipe = bp.compile(model, example, lm_loss, schedule="1f1b", devices=2, microbatches=4, optimizer=adam)
    state = pipe.state_dict()
    del state["model"]["blocks.0.ln1.weight"]
    with pytest.raises(ConfigError, match=r"state dict lacks 1 tensor\(s\) of stage 0, e.g. \['blocks.0.ln1.weight'\]"):
        pipe.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"expected 'model'"):
        pipe.load_state_dict({"weights": {}})
    state = pipe.state_dict()
    state["optimizer"]["param_groups"].append(dict(state["optimizer"]["param_groups"][0]))
    with pytest.raises(ConfigError, match="saved optimizer state has 2 parameter groups, the optimizer has 1"):
        pipe.load_state_dict(state)
