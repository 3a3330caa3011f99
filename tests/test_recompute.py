"""Activation recomputation (runtime/chunk.py, bitpipe_fx/recompute.py): float64 gradients equal to storing the
activations in every family with dropout on, one recomputation per micro-batch even with the I/W split,
batch-norm statistics updated once, bad values refused, and "auto" recomputing more under a tighter limit."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import bitpipe_fx as bp
from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.compiler import build_plan
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.plan import Plan
from bitpipe_fx.recompute import with_recompute
from bitpipe_fx.runtime.launch import launch
from bitpipe_fx.schedules import SCHEDULES
from bitpipe_fx.sim import simulate
from tests.support.batchnorm import N as BN_N
from tests.support.batchnorm import batches as bn_batches
from tests.support.batchnorm import bn_mlp, pipeline
from tests.support.cases import model_case
from tests.support.reference import max_rel_err
from tests.support.workers import contract_worker

_CASE: dict[str, object] = {}


def bert():
    """The examples' BERT-style model with dropout 0.1, float64 (captured once)."""
    if "bert" not in _CASE:
        _CASE["bert"] = model_case("bert")
    return _CASE["bert"]


def _peak(plan) -> float:
    return max(m.total for m in plan.memory())


def _run(case, plan, split, flags: tuple[bool, ...]) -> tuple[CompiledPipeline, float, dict[str, torch.Tensor]]:
    pipe = CompiledPipeline(split, plan.program, case.loss_fn, case.example_inputs, recompute=flags, seed=5)
    inputs, targets = case.batches(2 * plan.microbatches, 11)
    loss = pipe.forward_backward(inputs, targets)
    return pipe, loss, pipe.gradients()


def _chunks(pipe: CompiledPipeline):
    return [c for it in pipe.executor._train for c in it.chunks.values()]


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_full_and_auto_recompute_give_the_stored_gradients_with_dropout(schedule):
    case = bert()
    plan, split = build_plan(case.model, case.example_inputs, schedule, 4, 8)
    full = (True,) * plan.num_stages
    auto = with_recompute(plan, "auto", 0.99 * _peak(plan)).recompute
    assert any(auto)
    mixed = tuple(s % 2 == 0 for s in range(plan.num_stages))
    _, loss, stored = _run(case, plan, split, ())
    for flags in (full, auto, mixed):
        pipe, again, grads = _run(case, plan, split, flags)
        assert abs(again - loss) <= 1e-12 * abs(loss)
        assert sorted(grads) == sorted(stored)
        assert max(max_rel_err(grads[k], stored[k]) for k in stored) <= 1e-12
        for c in _chunks(pipe):  # once per micro-batch of its pipe, whether the backward is split or not
            assert c.recomputed == (plan.program.pipe_of.count(c.pipe) if flags[c.stage] else 0), (c.pipe, c.stage)
            assert not c.saved


def test_recomputation_replays_the_forwards_random_stream():
    """Recomputing from another generator state draws other dropout masks: the gradients then differ."""
    case = bert()
    plan, split = build_plan(case.model, case.example_inputs, "zbv", 4, 8)
    _, _, stored = _run(case, plan, split, ())
    pipe = CompiledPipeline(split, plan.program, case.loss_fn, case.example_inputs,
                            recompute=(True,) * plan.num_stages, seed=5)
    for c in _chunks(pipe):
        keep = c.started_from
        c.started_from = lambda m, state, keep=keep: keep(m, bp.runtime.rng.key_state(99, 0, m))
    inputs, targets = case.batches(16, 11)
    pipe.forward_backward(inputs, targets)
    grads = pipe.gradients()
    assert max(max_rel_err(grads[k], stored[k]) for k in stored) > 1e-3


@pytest.mark.parametrize("schedule", ["1f1b", "zbv", "bitpipe"])
def test_batch_norm_statistics_are_updated_once_per_microbatch(schedule):
    model, data = bn_mlp(), bn_batches(2)
    plain = pipeline(model, schedule, 2)
    stages = plain.program.stages
    again = pipeline(model, schedule, 2, recompute=(True,) * stages)
    for x, y in data:
        plain.step(x, y)
        again.step(x, y)
    want, got = plain.full_state_dict(), again.full_state_dict()
    assert any("running_mean" in k for k in want)
    assert max(max_rel_err(got[k].double(), want[k].double()) for k in want) <= 1e-12
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want if "num_batches" in k)
    per_step = sum(again.program.pipe_of.count(c.pipe) for c in _chunks(again))  # each chunk: its pipe's
    assert sum(c.recomputed for c in _chunks(again)) == len(data) * per_step == len(data) * BN_N * stages


def test_a_bad_recompute_value_is_refused_by_name():
    case = bert()
    with pytest.raises(ConfigError, match=r"recompute must be one of 'none', 'full', 'auto', got 'sometimes'"):
        bp.compile(case.model, case.example_inputs, case.loss_fn, schedule="1f1b", devices=2, microbatches=2,
                   recompute="sometimes")
    with pytest.raises(ConfigError, match=r"recompute='auto' needs memory_limit"):
        build_plan(case.model, case.example_inputs, "1f1b", 2, 2, recompute="auto")
    with pytest.raises(ConfigError, match=r"recompute has 3 flags but the program has 4 stages"):
        plan, split = build_plan(case.model, case.example_inputs, "1f1b", 4, 4)
        CompiledPipeline(split, plan.program, case.loss_fn, case.example_inputs, recompute=(True,) * 3)


def test_auto_recomputes_more_under_a_tighter_limit_and_refuses_an_impossible_one():
    case = bert()
    plan, _ = build_plan(case.model, case.example_inputs, "bitpipe", 4, 8)
    none, full = _peak(plan), _peak(replace(plan, recompute=(True,) * plan.num_stages))
    assert full < none
    loose, tight = none - 0.25 * (none - full), full + 0.05 * (none - full)
    chosen = {}
    for name, limit in (("loose", loose), ("tight", tight)):
        got, _ = build_plan(case.model, case.example_inputs, "bitpipe", 4, 8, recompute="auto", memory_limit=limit)
        assert _peak(got) <= limit
        chosen[name] = sum(got.recompute)
    assert 0 < chosen["loose"] < chosen["tight"] <= plan.num_stages
    fits, _ = build_plan(case.model, case.example_inputs, "bitpipe", 4, 8, recompute="auto", memory_limit=2 * none)
    assert fits.recompute == ()
    with pytest.raises(ConfigError, match=r"cannot fit memory_limit=.* even recomputing every stage the predicted "
                                          r"peak is"):
        build_plan(case.model, case.example_inputs, "bitpipe", 4, 8, recompute="auto", memory_limit=0.5 * full)


def test_schedule_auto_searches_recompute_with_the_schedule():
    """Under a limit that no candidate meets storing activations, auto+recompute finds one that fits."""
    case = bert()
    with pytest.raises(ConfigError, match="no schedule fits memory_limit") as info:
        build_plan(case.model, case.example_inputs, "auto", 4, 8, memory_limit=1)  # nothing pruned: all simulated
    smallest = float(re.search(r"the smallest predicted peak is (\S+) bytes", str(info.value)).group(1))
    limit = 0.97 * smallest
    with pytest.raises(ConfigError, match="no schedule fits memory_limit"):
        build_plan(case.model, case.example_inputs, "auto", 4, 8, memory_limit=limit)
    plan, _ = build_plan(case.model, case.example_inputs, "auto", 4, 8, memory_limit=limit, recompute="auto")
    win = plan.search.winner
    assert win.status == "ok" and win.peak <= limit and win.recomputed
    assert win.recomputed == tuple(s for s, f in enumerate(plan.recompute) if f)
    assert "recompute" in plan.summary()
    assert Plan.from_json(plan.to_json()) == plan  # the choice and the ranking's recomputed stages round-trip


def test_a_plan_keeps_its_recomputation_and_compile_can_change_it():
    case = bert()
    stored, _ = build_plan(case.model, case.example_inputs, "zbv", 4, 8)
    plan, _ = build_plan(case.model, case.example_inputs, "zbv", 4, 8, recompute="full")
    assert plan.recompute == (True,) * 8 and Plan.from_json(plan.to_json()) == plan
    assert plan.cost_model().recompute == plan.forward  # each B or I first runs its stage's forward again
    assert simulate(plan.program, plan.cost_model()).makespan > simulate(stored.program, stored.cost_model()).makespan
    kept = bp.compile(case.model, case.example_inputs, case.loss_fn, plan=plan)
    assert kept.recompute == plan.recompute
    dropped = bp.compile(case.model, case.example_inputs, case.loss_fn, plan=plan, recompute="none")
    assert dropped.recompute == () and dropped.plan.recompute == ()


def test_cli_memory_limit_goes_to_recompute_or_to_schedule_auto():
    from bitpipe_fx.train.command import add_parser, config_from_args

    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(sub, "train", "")
    own = config_from_args(parser.parse_args(["--recompute", "auto", "--memory-limit", "1GiB"]))
    assert (own.recompute, own.memory_limit, own.schedule_options) == ("auto", "1GiB", ())
    searched = config_from_args(parser.parse_args(["--schedule", "auto", "--recompute", "auto",
                                                   "--memory-limit", "1GiB"]))
    assert (searched.memory_limit, dict(searched.schedule_options)) == (None, {"memory_limit": "1GiB"})


def test_train_with_recompute_full_matches_the_reference_in_float64(tmp_path):
    args = ["--model", "bert", "--arg", "dim=32", "--arg", "layers=2", "--arg", "heads=2", "--arg", "dropout=0.1",
            "--devices", "2", "--microbatches", "4", "--batch-size", "8", "--seq-len", "16", "--steps", "2",
            "--compare-steps", "2", "--dtype", "float64", "--local", "--recompute", "full", "--max-bytes", "200000",
            "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-m", "bitpipe_fx.cli", "train", *args], capture_output=True, text=True,
                          timeout=240, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reference = json.loads((tmp_path / "metrics.json").read_text())["reference"]
    assert reference["agree"] and reference["max_rel_diff"] <= 1e-12, reference
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.recompute == (True,) * plan.num_stages


@pytest.mark.dist
def test_recompute_over_torch_distributed_meets_the_contract_in_every_family():
    """D=2 over gloo, every stage recomputed, BERT with dropout: loss, gradients and parameters after 3 steps
    within 1e-12 of the non-pipelined reference on every rank."""
    jobs = [("bert", s, 2, 4, 1) for s in sorted(SCHEDULES)]
    per_rank = launch(contract_worker, 2, args=(jobs, 30.0, True), timeout=120, join_timeout=600)
    assert sorted(r["schedule"] for r in per_rank[0]) == sorted(SCHEDULES)
    for results in per_rank:
        for r in results:
            assert r["loss_err"] <= 1e-12 and r["grad_err"] <= 1e-12 and r["param_err"] <= 1e-12, r
