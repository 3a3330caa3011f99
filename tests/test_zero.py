"""Sharded optimizer state (ZeRO-1, runtime.zero) in float64 over real gloo processes (D = 2 x data-parallel 2):
the same numbers as unsharded, state bytes per rank divided by the copy group, checkpoints across sharding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitpipe_fx import cli
from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.runtime.launch import LaunchError, launch
from bitpipe_fx.schedules import generate
from tests.support.toy import Toy, mse, toy_split
from tests.support.zero import checkpoint_worker, equality_worker, stall_worker

BOUND = 4.0  # seconds: the runtime's wait bound in the stall test


@pytest.mark.dist
@pytest.mark.parametrize(("schedule", "group"), [("bitpipe", 4), ("1f1b", 2)])
def test_sharded_equals_unsharded_and_divides_the_state_by_the_group(schedule, group):
    results = launch(equality_worker, 4, args=(schedule,), timeout=120, join_timeout=600)
    for r in results:
        for name in ("sf-adamw", "sgd"):
            got = r[name]
            for key in ("loss_err", "param_err", "export_err", "eval_err"):
                assert got[key] <= 1e-12, (r["rank"], name, key, got)
            assert got["moved"] > 1e-3, got  # it trained: the comparison is not of untouched weights
    # the copy group of a stage: every rank for bitpipe (both devices hold every stage), the two data-parallel
    # ranks of one device for 1f1b; across a group each element's state is held exactly once
    groups = [[0, 1, 2, 3]] if group == 4 else [[0, 2], [1, 3]]
    stages = 4 if group == 4 else 1  # stages (flat buffers) per rank: each may pad its shard by < 1 element
    for ranks in groups:
        for name, keys in (("sf-adamw", 2), ("sgd", 1)):
            whole = results[ranks[0]][name]["numel"][0]
            assert all(results[k][name]["numel"][0] == whole for k in ranks)
            shards = [results[k][name]["numel"][1] for k in ranks]
            assert sum(shards) == whole, (name, shards, whole)
            assert max(shards) <= whole / group + keys * stages, (name, shards, whole)


@pytest.mark.dist
def test_a_sharded_checkpoint_resumes_unsharded_and_back(tmp_path):
    results = launch(checkpoint_worker, 4, args=(str(tmp_path),), timeout=120, join_timeout=600)
    for r in results:
        for saved in ("sharded", "whole"):
            assert r[saved]["loss_err"] <= 1e-12, (r["rank"], saved, r[saved])
            assert r[saved]["param_err"] <= 1e-12, (r["rank"], saved, r[saved])
            assert r[saved]["compared"] >= 20, r[saved]  # the rank's 1f1b stage: half of the model
            # state_dict() right after the load equals the saving run's, whole per FQN, for every parameter
            assert r[saved]["state_equal"] and r[saved]["z_shapes_ok"], r[saved]
            assert r[saved]["state_keys"] == r[saved]["compared"], r[saved]


@pytest.mark.dist
def test_a_stalled_peer_fails_the_reduce_scatter_within_the_bound_naming_stage_and_peers():
    with pytest.raises(LaunchError) as info:
        launch(stall_worker, 2, args=(BOUND,), timeout=30, grace=3, join_timeout=120)
    err = info.value
    assert err.first_rank == 0 and err.errors[0] == "PipelineRuntimeError", err.errors
    assert f"rank 0: gradient reduce-scatter of stage 0 with ranks [1] did not finish within {BOUND}s" in \
        err.tracebacks[0]


def _toy_pipe(**kwargs) -> CompiledPipeline:
    return CompiledPipeline(toy_split(Toy(depth=2), 2), generate("1f1b", 2, 4), mse, torch.zeros(2, 5),
                            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), **kwargs)


def test_shard_optimizer_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"shard_optimizer must be True or False .* got 'yes'"):
        _toy_pipe(shard_optimizer="yes")


def test_shard_optimizer_in_one_process_is_refused_naming_the_fix():
    with pytest.raises(ConfigError, match=r"shard_optimizer=True .* runs in one process: launch devices x "
                                          r"data_parallel processes .* or drop it"):
        _toy_pipe(shard_optimizer=True)


TRAIN = ["--arg", "dim=16", "--arg", "layers=2", "--arg", "heads=2", "--devices", "2", "--data-parallel", "2",
         "--microbatches", "2", "--batch-size", "8", "--seq-len", "8", "--dtype", "float64", "--lr", "1e-2",
         "--warmup", "0", "--save-every", "3", "--max-bytes", "100000", "--seed", "3"]


def _train(out: Path, *extra: str) -> list[float]:
    exe = Path(sys.executable).with_name("bitpipe-fx")
    proc = subprocess.run([str(exe), "train", *TRAIN, "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((out / "metrics.json").read_text())["losses"]


@pytest.mark.dist
@pytest.mark.slow
def test_train_shard_optimizer_resumes_unsharded_as_the_uninterrupted_run(tmp_path):
    _train(tmp_path / "part", "--steps", "3", "--shard-optimizer")
    resumed = _train(tmp_path / "part", "--steps", "5", "--resume")
    whole = _train(tmp_path / "whole", "--steps", "5")
    assert len(resumed) == len(whole) == 5
    assert all(abs(a - b) <= 1e-12 * abs(b) for a, b in zip(resumed, whole)), (resumed, whole)


def test_train_refuses_shard_optimizer_with_local(tmp_path, capsys):
    rc = cli.main(["train", *TRAIN, "--local", "--shard-optimizer", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "--shard-optimizer shards optimizer state over the processes holding copies of a stage and --local" in err


@pytest.mark.dist
def test_shard_state_benchmark_smoke_divides_state_by_the_group(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "shard_state.py"), "--smoke", "--out",
                           str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "shard_state.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["group"] == "4" for r in rows)
    for r in rows:  # bitpipe D=2 x dp=2: every stage has four copies; the tiny model's padding is < 0.1 %
        assert r["ratio"] == pytest.approx(4.0, rel=1e-3) and r["loss_rel_err"] <= 1e-5, r
