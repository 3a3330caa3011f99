"""The randomness rule (runtime.rng): keyed streams per global micro-batch, carried across stage cuts.

Bit-exactness is checked where the arithmetic is the same (one forward, eager vs captured vs split);
whole pipelined steps under every family are checked against the reference in test_numerics/test_dist.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples import models as ex
from bitpipe_fx.passes import capture, estimate_costs, partition, split
from bitpipe_fx.runtime import rng
from bitpipe_fx.schedules import SCHEDULES, generate
from bitpipe_fx.train.reference import accumulate


def _bert():
    model, example = ex.bert(layers=4, dropout=0.1)
    return model.double(), example


def _chain(stages, specs, by_name, state):
    """Run split stages in order, each continuing the stream the previous one left (what the runtime does)."""
    received: tuple = ()
    for stage, spec in zip(stages, specs):
        with rng.stream(state, rng.CPU) as s:
            out = stage(*(by_name[n] for n in spec.model_inputs), *received)
        received, state = (tuple(out) if isinstance(out, (tuple, list)) else (out,)), s.after
    return received


def test_key_depends_on_seed_step_and_microbatch_only():
    keys = {rng.microbatch_key(seed, step, m) for seed in (0, 1) for step in (0, 1, 2) for m in range(4)}
    assert len(keys) == 24 and all(0 <= k < 2**63 for k in keys)
    assert rng.microbatch_key(3, 5, 7) == rng.microbatch_key(3, 5, 7)
    assert torch.equal(rng.key_state(3, 5, 7), rng.key_state(3, 5, 7))


def test_stream_restores_the_callers_state_and_reports_what_the_body_left():
    torch.manual_seed(11)
    before = torch.get_rng_state()
    start = rng.key_state(0, 0, 0)
    with rng.stream(start, rng.CPU) as s:
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with rng.stream(s.after, rng.CPU):
        second = torch.rand(3)
    torch.set_rng_state(start)
    assert torch.equal(torch.rand(6), torch.cat([first, second]))  # continued, not restarted


def test_captured_and_split_graph_draw_exactly_like_the_eager_model():
    model, example = _bert()
    tokens, mask, _ = ex.mlm_batch(128, 2, 16, seed=4)
    model.train()
    with rng.keyed(0, 1, 2):
        eager = model(tokens, mask)
    captured = capture(model, example)
    flat = captured.flatten_inputs((tokens, mask), {})
    with rng.keyed(0, 1, 2):
        graph = captured.graph_module(*flat)
    graph = graph[0] if isinstance(graph, (tuple, list)) else graph
    assert torch.equal(graph, eager)
    costs = estimate_costs(captured)
    for stages in (2, 4, 8):
        cut = split(captured, partition(costs, generate("gpipe", stages, stages).placement))
        out = _chain(cut.stages, cut.specs, dict(zip(cut.input_names, flat)), rng.key_state(0, 1, 2))
        assert torch.equal(cut.unflatten_output(out), eager), stages
    with rng.keyed(0, 1, 3):
        other = model(tokens, mask)
    assert not torch.equal(other, eager)  # another micro-batch, another mask


class _Drop(nn.Module):
    """A linear layer whose input is dropped out: the loss shows the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8).double(), nn.Linear(8, 1).double()

    def forward(self, x):
        return self.b(torch.relu(self.a(nn.functional.dropout(x, 0.5, self.training))))


def _sq(out, y):
    return ((out - y) ** 2).mean()


def _drop_pipe(schedule: str, devices: int, seed: int = 0) -> tuple[CompiledPipeline, nn.Module]:
    torch.manual_seed(0)
    model = _Drop()
    captured = capture(model, (torch.zeros(2, 8, dtype=torch.float64),))
    program = generate(schedule, devices, 4)
    cut = split(captured, partition(estimate_costs(captured), program.placement))
    return CompiledPipeline(cut, program, _sq, (torch.zeros(2, 8, dtype=torch.float64),), seed=seed), model


def test_microbatches_steps_and_seeds_get_different_masks():
    pipe, model = _drop_pipe("gpipe", 2)
    x, y = torch.ones(8, 8, dtype=torch.float64), torch.zeros(8, 1, dtype=torch.float64)
    at_step = []
    for step in (0, 1):
        per_mb = []
        for m in range(4):
            with torch.no_grad(), rng.keyed(0, step, m):
                per_mb.append(float(_sq(model(x[2 * m : 2 * m + 2]), y[:2])))
        assert len(set(per_mb)) == 4  # identical rows, different masks
        pipe.steps_taken = step
        at_step.append(pipe.evaluate(x, y))  # train mode: dropout on
        assert abs(at_step[-1] - sum(per_mb) / 4) <= 1e-15 * at_step[-1], step
    assert at_step[0] != at_step[1]
    other, _ = _drop_pipe("gpipe", 2, seed=1)
    assert other.evaluate(x, y) != at_step[0]


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_results_do_not_depend_on_the_callers_generator(schedule):
    x = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    losses, grads = [], []
    for caller_seed in (5, 6):
        pipe, model = _drop_pipe(schedule, 2)
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        losses.append(pipe.forward_backward(x, y))
        assert torch.equal(torch.get_rng_state(), before)  # the step leaves the caller's stream alone
        grads.append(pipe.gradients())
    ref = copy.deepcopy(model)
    parts = [((xm,), ym) for xm, ym in zip(x.tensor_split(4), y.tensor_split(4))]
    ref_loss = accumulate(ref, parts, _sq, 0, 0)
    assert losses[0] == losses[1] and abs(losses[0] - ref_loss) <= 1e-12 * ref_loss
    for name, p in ref.named_parameters():
        assert torch.equal(grads[0][name], grads[1][name])
        assert (grads[0][name] - p.grad).abs().max() <= 1e-12 * p.grad.abs().max(), name


def test_seed_must_be_a_non_negative_integer():
    with pytest.raises(ConfigError, match=r"seed must be a non-negative integer .* got -1"):
        _drop_pipe("gpipe", 2, seed=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_continues_across_a_cut_and_matches_the_reference():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = _Drop().to(device)
    x = torch.ones(2, 8, dtype=torch.float64, device=device)
    with rng.keyed(0, 0, 0, device):
        whole = nn.functional.dropout(x, 0.5) * torch.rand(1, device=device) * torch.rand(1).to(device)
    with rng.stream(rng.key_state(0, 0, 0, device), device) as s:
        first = nn.functional.dropout(x, 0.5)
    with rng.stream(s.after, device):
        second = first * torch.rand(1, device=device) * torch.rand(1).to(device)
    assert torch.equal(whole, second)
    captured = capture(model, (x,))
    program = generate("bitpipe", 2, 4)
    cut = split(captured, partition(estimate_costs(captured), program.placement))
    pipe = CompiledPipeline(cut, program, _sq, (x,))
    xb = torch.randn(8, 8, dtype=torch.float64, device=device)
    yb = torch.randn(8, 1, dtype=torch.float64, device=device)
    loss = pipe.forward_backward(xb, yb)
    parts = [((xm,), ym) for xm, ym in zip(xb.tensor_split(4), yb.tensor_split(4))]
    ref = accumulate(copy.deepcopy(model), parts, _sq, 0, 0)
    assert abs(loss - ref) <= 1e-12 * abs(ref)
