"""Failures never hang: a rank that raises, dies or stalls mid-step makes its peer raise PipelineRuntimeError
within the bound, and the launcher reports the first failure with its traceback.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitpipe_fx.runtime.launch import LaunchError, launch
from tests.support.workers import fault_worker

pytestmark = pytest.mark.dist
BOUND = 4.0  # seconds: the runtime's wait bound in these tests
ROOT = Path(__file__).resolve().parents[1]  # the script's ranks import tests.support from here


def _elapsed_in_step(traceback_text: str) -> float:
    return float(re.search(r"failed ([0-9.]+)s into the step", traceback_text).group(1))


def test_raising_rank_via_the_command_line(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("from tests.support.workers import fault_main\n\nfault_main()\n")
    cmd = [sys.executable, "-m", "bitpipe_fx.runtime.launch", "--nprocs", "2", "--timeout", "30", str(script),
           "raise", str(BOUND)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1
    assert "rank 1 failed first (ValueError); other failures: rank 0: PipelineRuntimeError" in done.stderr
    assert "ValueError: injected failure in loss_fn on rank 1" in done.stderr  # the first traceback


def test_dying_rank():
    with pytest.raises(LaunchError) as info:
        launch(fault_worker, 2, args=("die", BOUND), timeout=30, grace=20, join_timeout=120)
    err = info.value
    assert err.first_rank == 1 and err.errors[1] == "exit code 3" and err.exitcodes[1] == 3
    assert err.errors[0] == "PipelineRuntimeError"
    assert "rank 0 (device 0), running" in err.tracebacks[0] and "peer rank 1" in err.tracebacks[0]
    assert _elapsed_in_step(err.tracebacks[0]) <= BOUND + 2


def test_stalled_rank_is_detected_within_the_bound():
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(fault_worker, 2, args=("stall", BOUND), timeout=30, grace=3, join_timeout=120)
    err = info.value
    assert err.first_rank == 0 and err.errors[0] == "PipelineRuntimeError"
    assert f"no answer within {BOUND}s" in err.tracebacks[0]
    assert BOUND - 0.5 <= _elapsed_in_step(err.tracebacks[0]) <= BOUND + 2
    assert err.errors[1] == "killed"  # the stalled rank is killed after the grace period, nothing hangs
    assert time.monotonic() - start < 60
