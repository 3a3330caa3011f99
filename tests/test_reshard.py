"""Resharded resume through the real console script: bitpipe at D=4 for 3 steps, then 1f1b at D=2 x
data-parallel 2, then one process (--local, gpipe at D=2), continue exactly (float64) the losses of an
uninterrupted run and of the non-pipelined reference; a damaged checkpoint is refused before any process starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitpipe_fx.train import checkpoint
from bitpipe_fx.train.job import TrainConfig
from bitpipe_fx.train.reference import reference_losses

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ARGS = ["--arg", "dim=16", "--arg", "layers=2", "--arg", "heads=2", "--microbatches", "4", "--batch-size", "8",
        "--seq-len", "8", "--dtype", "float64", "--max-bytes", "100000", "--eval-batches", "1", "--save-every", "1",
        "--warmup", "0", "--lr", "1e-2", "--seed", "5"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _train(out: Path, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("bitpipe-fx")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "bitpipe_fx.cli"]
    proc = subprocess.run([*command, "train", *ARGS, "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


def _losses(out: Path) -> list[float]:
    return json.loads((out / "metrics.json").read_text())["losses"]


def test_resume_under_another_schedule_device_count_data_parallel_size_and_in_one_process(tmp_path):
    run = tmp_path / "run"
    _train(run, "--schedule", "bitpipe", "--devices", "4", "--steps", "3")
    assert len(list(checkpoint.step_dir(run, 3).glob("__*_0.distcp"))) == 4  # every rank wrote its part
    _train(run, "--schedule", "1f1b", "--devices", "2", "--data-parallel", "2", "--steps", "5", "--resume")
    _train(run, "--schedule", "gpipe", "--devices", "2", "--local", "--steps", "6", "--resume")
    resumed = _losses(run)
    whole = tmp_path / "whole"
    _train(whole, "--schedule", "bitpipe", "--devices", "4", "--steps", "6")
    uninterrupted = _losses(whole)
    reference = reference_losses(TrainConfig.from_dict(checkpoint.read_latest(run)["config"]), 6)
    assert len(resumed) == 6
    for a, b, c in zip(resumed, uninterrupted, reference):
        assert abs(a - b) <= 1e-12 * abs(b) and abs(a - c) <= 1e-12 * abs(c), (resumed, uninterrupted, reference)

    # damage the latest checkpoint: refused in the launcher, naming the file and the last good step
    data = sorted(checkpoint.step_dir(run, 6).glob("__*.distcp"))[0]
    data.write_bytes(data.read_bytes()[:-1])
    start = time.perf_counter()
    proc = _train(run, "--steps", "8", "--devices", "2", "--local", "--resume", ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"bitpipe-fx train: error: --resume: the checkpoint of step 6 is damaged: {data} has "
        f"{data.stat().st_size} bytes, the manifest says {data.stat().st_size + 1}; the last good checkpoint is "
        "step 5 (--resume-from 5)")
    assert "starting" not in proc.stdout and time.perf_counter() - start < 30
    _train(run, "--steps", "7", "--devices", "2", "--local", "--resume-from", "5")
    assert abs(_losses(run)[5] - uninterrupted[5]) <= 1e-12 * abs(uninterrupted[5])
