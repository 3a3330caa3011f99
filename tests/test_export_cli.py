"""`bitpipe-fx export` on a real 2-process run: the merged ranks' weights equal an unpipelined reference
trained with the schedulefree package (eval x by default, --weights train for y)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitpipe_fx import export
from bitpipe_fx.train.data import Batches, load_corpus
from bitpipe_fx.train.job import TrainConfig, build_model, loss_fn
from tests.support.reference import max_rel_err

schedulefree = pytest.importorskip("schedulefree")
pytestmark = [pytest.mark.dist, pytest.mark.slow]

ARGS = ["--arg", "dim=16", "--arg", "layers=2", "--arg", "heads=2", "--devices", "2", "--microbatches", "2",
        "--batch-size", "4", "--seq-len", "8", "--steps", "3", "--optimizer", "sf-sgd", "--lr", "0.05",
        "--warmup", "0", "--dtype", "float64", "--max-bytes", "100000", "--eval-batches", "1", "--seed", "3"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _cli(*argv: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("bitpipe-fx")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "bitpipe_fx.cli"]
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=240, env=ENV)


def _reference(cfg: TrainConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The run trained without pipelining by schedulefree.SGDScheduleFree: {"eval": x, "train": y}."""
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg)
    opt = schedulefree.SGDScheduleFree(model.parameters(), lr=cfg.lr, warmup_steps=cfg.warmup)
    opt.train()
    batches = Batches(load_corpus(cfg.data, cfg.max_bytes), cfg.task, cfg.batch_size, cfg.seq_len, cfg.seed)
    for k in range(1, cfg.steps + 1):
        inputs, targets = batches.train(k)
        opt.zero_grad()
        for x, y in zip(inputs.tensor_split(cfg.microbatches), targets.tensor_split(cfg.microbatches)):
            (loss_fn(model(x), y) / cfg.microbatches).backward()
        opt.step()
    y = {k: v.clone() for k, v in model.state_dict().items()}
    opt.eval()
    return {"eval": {k: v.clone() for k, v in model.state_dict().items()}, "train": y}


def test_export_command_writes_the_runs_eval_and_train_weights(tmp_path):
    run = tmp_path / "run"
    proc = _cli("train", *ARGS, "--out", str(run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    x_path, y_path = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    proc = _cli("export", str(run), "--out", str(x_path))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {x_path}: " in proc.stdout and "eval weights at step 3" in proc.stdout
    assert _cli("export", str(run), "--out", str(y_path), "--weights", "train").returncode == 0
    from bitpipe_fx.train.checkpoint import read_latest

    want = _reference(TrainConfig.from_dict(read_latest(run)["config"]))
    for path, mode in ((x_path, "eval"), (y_path, "train")):
        got = export.load(path)
        assert set(got) == set(want[mode])
        for k, v in want[mode].items():
            assert max_rel_err(got[k], v) <= 1e-10, (mode, k)
    x, y = export.load(x_path), export.load(y_path)
    assert any(not torch.equal(x[k], y[k]) for k in x)


def test_export_command_refuses_a_folder_without_a_run(tmp_path):
    proc = _cli("export", str(tmp_path), "--out", str(tmp_path / "m.safetensors"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"bitpipe-fx export: error: {tmp_path} holds no checkpoint "
                                   f"({tmp_path}/checkpoint/latest.json is missing); pass the --out folder of a "
                                   "`bitpipe-fx train` run")
