"""Batch norm in a pipeline (runtime/buffers.py): running statistics in micro-batch order, eval mode, and a
caller's model that compile() leaves alone. float64 against the non-pipelined reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.api import compile as bp_compile
from bitpipe_fx.schedules import SCHEDULES
from tests.support.batchnorm import ROWS, N, bn_mlp, pipeline, reference
from tests.support.batchnorm import batches as _batches
from tests.support.batchnorm import sq as _sq
from tests.support.reference import sgd


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.double().abs().max().item()
    return (a.double() - b.double()).abs().max().item() / (scale or 1.0)


def state_errors(pipe: CompiledPipeline, ref: nn.Module) -> dict[str, float]:
    full = pipe.full_state_dict()
    want = ref.state_dict()
    assert sorted(full) == sorted(want)  # every buffer (running stats, counters) is in the state dict
    return {k: _rel(full[k], want[k]) for k in want}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_running_statistics_and_parameters_match_sequential_accumulation(schedule):
    model = bn_mlp()
    batches = _batches(3)
    pipe = pipeline(model, schedule, 2)
    for x, y in batches:
        pipe.step(x, y)
    ref = reference(model, batches, N)
    errors = state_errors(pipe, ref)
    assert max(errors.values()) <= 1e-12, errors
    assert int(pipe.full_state_dict()["1.num_batches_tracked"]) == 3 * N
    pipe.eval()
    ref.eval()
    x, y = _batches(1)[0]
    with torch.no_grad():
        want = sum(float(_sq(ref(xm), ym)) for xm, ym in zip(x.tensor_split(N), y.tensor_split(N))) / N
    got = pipe.evaluate(x, y)
    assert abs(got - want) <= 1e-12 * want  # eval mode: running statistics, no dropout
    assert state_errors(pipe, ref) == errors  # evaluation in eval mode changes no buffer


def test_replicas_end_every_step_with_identical_buffers():
    pipe = pipeline(bn_mlp(), "bitpipe", 4)
    for x, y in _batches(2):
        pipe.step(x, y)
        by_name: dict[str, list[torch.Tensor]] = {}
        for r in pipe.executor.replicas:
            for name, b in r.module.named_buffers():
                by_name.setdefault(name, []).append(b)
        assert any(len(copies) == 2 for copies in by_name.values())
        for name, copies in by_name.items():
            assert all(torch.equal(c, copies[0]) for c in copies), name


def test_compile_leaves_the_callers_model_unchanged():
    model = bn_mlp()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = bp_compile(model, torch.zeros(ROWS, 4, dtype=torch.float64), _sq, schedule="1f1b", devices=2,
                      microbatches=N, optimizer=sgd)
    pipe.train()
    for x, y in _batches(2):
        pipe.step(x, y)
    assert model.training is False and all(not m.training for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
