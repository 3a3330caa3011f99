"""End to end under a real torchrun: 2 gloo ranks train 3 steps with bitpipe, a second torchrun resumes them
with 1f1b for 2 more, and the losses equal an uninterrupted 5-step run's (float64, one process: ``--local``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"
ARGS = ["--arg", "dim=16", "--arg", "layers=2", "--arg", "heads=2", "--devices", "2", "--microbatches", "2",
        "--batch-size", "4", "--seq-len", "8", "--max-bytes", "100000", "--lr", "1e-2", "--warmup", "0",
        "--eval-every", "2", "--eval-batches", "1", "--save-every", "0", "--seed", "3", "--dtype", "float64"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    command = [*launcher, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               str(SCRIPT), *ARGS, *argv]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_torchrun_resume_under_another_schedule_continues_exactly(tmp_path):
    run, whole = tmp_path / "run", tmp_path / "whole"
    first = _torchrun("--steps", "3", "--schedule", "bitpipe", "--out", str(run))
    assert "2 torchrun processes, gloo" in first.stdout
    assert json.loads((run / "checkpoint" / "latest.json").read_text())["step"] == 3
    assert (run / "checkpoint" / "step-000003").is_dir()
    assert len(_metrics(run)["losses"]) == 3
    resumed = _torchrun("--steps", "5", "--schedule", "1f1b", "--resume", "--out", str(run))
    assert "schedule 1f1b" in resumed.stdout and "steps 4..5" in resumed.stdout
    assert json.loads((run / "checkpoint" / "latest.json").read_text())["step"] == 5
    assert (run / "checkpoint" / "step-000005").is_dir()
    proc = subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--steps", "5", "--local", "--out", str(whole)],
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reference, got = _metrics(whole), _metrics(run)
    assert len(reference["losses"]) == 5
    assert got["losses"] == reference["losses"]  # float64, bit-identical across the schedule change
    assert got["val"] == reference["val"] and [s for s, _ in got["val"]] == [2, 4, 5]
