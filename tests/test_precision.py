"""bf16-mixed: fp32 master weights and optimizer state, bf16 compute and activations on the wire."""

from __future__ import annotations

import pytest
import torch

import bitpipe_fx as bp
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples.models import gpt, lm_loss
from bitpipe_fx.runtime.launch import launch
from tests.support.precision import bf16_steps


def test_bf16_mixed_keeps_fp32_masters_sends_bf16_and_tracks_fp32_over_20_steps():
    mixed = bf16_steps("bitpipe", 4, 20)
    full = bf16_steps("bitpipe", 4, 20, precision="fp32")
    assert mixed["param_dtypes"] == ["torch.float32"] and mixed["state_dtypes"] == ["torch.float32"]
    first, last = mixed["losses"][0], mixed["losses"][-1]
    assert last < first - 0.5  # it trains
    assert mixed["losses"] != full["losses"]  # bf16 compute really ran
    assert abs(last - full["losses"][-1]) <= 0.02 * full["losses"][-1], (last, full["losses"][-1])


def test_bf16_mixed_activations_are_bf16_between_stages_and_fp32_without_it():
    model, example = gpt(vocab=64, seq=16, micro_batch=2, layers=4, dim=32, heads=2)
    for precision, dtype in (("bf16-mixed", torch.bfloat16), ("fp32", torch.float32)):
        pipe = bp.compile(model, example, lm_loss, schedule="1f1b", devices=2, microbatches=2, precision=precision)
        sent = {spec.dtype for spec in pipe.executor.mailbox.specs.act(0) if spec.dtype.is_floating_point}
        assert sent == {dtype}, (precision, sent)
        pipe.forward_backward(*(lambda t: (t[:, :-1], t[:, 1:]))(torch.randint(0, 64, (4, 17))))
        assert {g.dtype for g in pipe.gradients().values()} == {torch.float32}  # reduction in fp32


def test_bf16_mixed_on_two_processes_equals_one_process():
    local = bf16_steps("bitpipe", 2, 3)
    ranks = launch(bf16_steps, 2, args=("bitpipe", 2, 3), timeout=120)
    for r in ranks:
        assert r["param_dtypes"] == ["torch.float32"]
        assert r["losses"] == pytest.approx(local["losses"], rel=1e-6)


def test_a_wrong_precision_is_refused_naming_it_before_capture():
    model, example = gpt(vocab=64, seq=16, micro_batch=2, layers=2, dim=32, heads=2)
    with pytest.raises(ConfigError, match=r"precision must be one of 'fp32', 'bf16-mixed', got 'bf16'"):
        bp.compile(model, example, lm_loss, schedule="1f1b", devices=2, microbatches=2, precision="bf16")
