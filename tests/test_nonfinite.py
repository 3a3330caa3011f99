"""Non-finite losses and gradients (runtime/nonfinite.py): NonFiniteError naming step, micro-batch, stage and
parameter, or a dropped update under on_nonfinite="skip"; locally, over 2 gloo processes, and in the CLI."""

from __future__ import annotations

import pytest
import torch

from bitpipe_fx import NonFiniteError
from bitpipe_fx.errors import BitPipeError, ConfigError
from bitpipe_fx.runtime.launch import launch
from tests.support.nonfinite import batch, nonfinite_worker, pipeline


def _last_stage_first_param(pipe) -> tuple[int, str]:
    last = max(r.stage for r in pipe.executor.replicas)
    return last, next(iter(next(r for r in pipe.executor.replicas if r.stage == last).params))


@pytest.mark.parametrize("schedule", ["1f1b", "bitpipe", "zbv"])
def test_a_nan_loss_raises_naming_step_microbatch_and_stage(schedule):
    pipe = pipeline(schedule, 2, "raise")
    pipe.step(*batch(None, 0))
    before = {k: p.detach().clone() for k, p in pipe.named_parameters().items()}
    last, _ = _last_stage_first_param(pipe)
    with pytest.raises(NonFiniteError, match=rf"^step 2: non-finite loss in micro-batch 2, stage {last}; no update"):
        pipe.step(*batch("loss", 2))
    assert issubclass(NonFiniteError, BitPipeError)
    assert all(torch.equal(p, before[k]) for k, p in pipe.named_parameters().items())
    assert all(p.grad is None or not p.grad.any() for p in pipe.named_parameters().values())


@pytest.mark.parametrize("schedule", ["gpipe", "bitpipe", "interleaved"])
def test_a_nan_gradient_with_a_finite_loss_names_the_first_parameter_where_it_arose(schedule):
    pipe = pipeline(schedule, 2, "raise")
    last, param = _last_stage_first_param(pipe)
    with pytest.raises(NonFiniteError, match=rf"^step 1: non-finite gradient of parameter '{param}' in "
                                             rf"micro-batch 1, stage {last};"):
        pipe.step(*batch("gradient", 1))


def test_skip_drops_the_update_counts_it_and_training_goes_on():
    pipe, clean = pipeline("bitpipe", 2, "skip"), pipeline("bitpipe", 2, "skip")
    for bad in (None, "gradient", "loss", None):
        pipe.step(*batch(bad, 1))
    for _ in range(2):
        clean.step(*batch(None, 1))
    assert pipe.skipped_steps == 2 and pipe.steps_taken == 4 and clean.skipped_steps == 0
    for name, p in clean.named_parameters().items():
        assert torch.equal(pipe.named_parameters()[name], p), name


def test_on_nonfinite_is_checked():
    with pytest.raises(ConfigError, match=r"on_nonfinite must be one of \['raise', 'skip'\], got 'ignore'"):
        pipeline("1f1b", 2, "ignore")


@pytest.mark.dist
def test_two_processes_raise_and_skip_alike_on_every_rank():
    results = launch(nonfinite_worker, 2, args=("1f1b",), timeout=60, join_timeout=300)
    assert len(results) == 2
    messages = {r["raise"] for r in results}
    assert len(messages) == 1  # the same decision and the same message on every rank
    last_param = results[0]["raise_first_params"].get(1) or results[1]["raise_first_params"][1]
    assert messages.pop() == (
        f"NonFiniteError: step 2: non-finite gradient of parameter '{last_param}' in micro-batch 3, stage 1; "
        "no update was applied. Lower the learning rate, check the data (or the loss for log(0)), or "
        "compile(..., on_nonfinite='skip') (bitpipe-fx train --on-nonfinite skip) to drop such steps"
    )
    for r in results:
        assert r["raise_unchanged"] and r["skip_unchanged"] and r["skip"] is None
        assert r["skip_skipped"] == 1 and r["raise_skipped"] == 0
