"""pipe.save_checkpoint / load_checkpoint (torch.distributed.checkpoint by original names), in one process:
a bitpipe checkpoint continues under 1f1b at another D exactly as the uninterrupted pipeline does."""

from __future__ import annotations

import copy

import pytest
import torch

import bitpipe_fx as bp
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from tests.support.reference import max_rel_err


def _pipe(model, example, schedule: str, devices: int):
    pipe = bp.compile(copy.deepcopy(model), example, lm_loss, schedule=schedule, devices=devices, microbatches=4,
                      optimizer=lambda ps: bp.optim.ScheduleFreeSGD(ps, lr=0.05))
    return pipe.train()


def test_a_checkpoint_continues_under_another_schedule_and_device_count(tmp_path):
    model, example = gpt()
    model = model.double()
    tokens, targets = lm_batch(128, 8, 16, seed=1)
    first = _pipe(model, example, "bitpipe", 2)
    for _ in range(2):
        first.step(tokens, targets)
    first.save_checkpoint(tmp_path / "ckpt", extra={"history": [1.5, 2.5]})
    saved = {k: p.detach().clone() for k, p in first.named_parameters().items()}
    saved_z = {k: first.optimizer.state[p]["z"].clone() for k, p in first.named_parameters().items()}
    expected = [first.step(tokens, targets) for _ in range(2)]
    second = _pipe(model, example, "1f1b", 4)
    assert second.load_checkpoint(tmp_path / "ckpt", extra=("history", "absent")) == {"history": [1.5, 2.5]}
    assert all(torch.equal(p, saved[k]) for k, p in second.named_parameters().items())  # restored exactly
    assert all(torch.equal(second.optimizer.state[p]["z"], saved_z[k]) for k, p in second.named_parameters().items())
    got = [second.step(tokens, targets) for _ in range(2)]
    assert all(abs(a - b) <= 1e-12 * abs(b) for a, b in zip(got, expected)), (got, expected)
    params = first.named_parameters()
    for name, p in second.named_parameters().items():
        assert max_rel_err(p.detach(), params[name].detach()) <= 1e-12, name


def test_loading_another_models_checkpoint_names_the_missing_tensors(tmp_path):
    small, example = gpt(layers=2)
    _pipe(small.double(), example, "1f1b", 2).save_checkpoint(tmp_path / "small")
    big, example = gpt(layers=4)
    pipe = _pipe(big.double(), example, "1f1b", 2)
    with pytest.raises(ConfigError, match=r"lacks 24 tensor\(s\) of this model, e\.g\. \['blocks\.2\."):
        pipe.load_checkpoint(tmp_path / "small")
    with pytest.raises(ConfigError, match=r"is not a readable checkpoint folder"):
        pipe.load_checkpoint(tmp_path / "nothing")
