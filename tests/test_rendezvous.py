"""Rendezvous problems under torchrun-style environment variables, one process: one clear BitPipeError line
within the --timeout bound (not torch's raw store or network error)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

EXE = Path(sys.executable).with_name("bitpipe-fx")
TINY = ["--arg", "dim=16", "--arg", "layers=2", "--arg", "heads=2", "--devices", "2", "--microbatches", "2",
        "--batch-size", "4", "--seq-len", "8", "--steps", "2", "--max-bytes", "200000", "--timeout", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(argv: list[str], port: int, world: int, rank: int = 0) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_RANK": "0"}
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    return proc, time.monotonic() - start


def test_a_peer_that_never_joins_is_one_line_within_the_timeout(tmp_path):
    port = free_port()
    proc, took = as_rank([str(EXE), "train", *TINY, "--out", str(tmp_path / "o")], port, 2)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"bitpipe-fx train: failed: the other processes did not join rank 0 of WORLD_SIZE "
                                  f"2 at 127.0.0.1:{port} within --timeout 3 s (")
    assert "start all WORLD_SIZE processes with the same MASTER_ADDR/MASTER_PORT" in proc.stderr
    assert took < 3 + 20  # the bound plus the start-up (imports, corpus, plan)


def test_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, _ = as_rank([str(EXE), "train", *TINY, "--out", str(tmp_path / "o")], port, 2)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"bitpipe-fx train: failed: cannot join the process group as rank 0 of WORLD_SIZE "
                                  f"2: MASTER_PORT {port} at 127.0.0.1:{port} is already in use by another program; "
                                  "pick a free port")


def test_a_world_size_that_does_not_match_is_refused_before_joining(tmp_path):
    proc, took = as_rank([str(EXE), "train", *TINY, "--out", str(tmp_path / "o")], free_port(), 3)
    assert proc.returncode == 2 and took < 20
    assert proc.stderr == ("bitpipe-fx train: error: torchrun started 3 processes but --devices 2 x --data-parallel 1 "
                           "needs 2; use --nproc-per-node/--nnodes giving 2\n")


def test_compile_under_a_world_nobody_completes_raises_within_its_timeout():
    code = ("import bitpipe_fx as bp\nfrom bitpipe_fx.errors import PipelineRuntimeError\n"
            "from bitpipe_fx.examples.models import gpt, lm_loss\nm, ex = gpt(dim=16, layers=2, heads=2, seq=8)\n"
            "try:\n    bp.compile(m, ex, lm_loss, '1f1b', 2, 2, timeout=3)\n"
            "except PipelineRuntimeError as e:\n    print(e)\n")
    proc, took = as_rank([sys.executable, "-c", code], free_port(), 3)
    assert proc.stdout.startswith("the other processes did not join rank 0 of WORLD_SIZE 3 at 127.0.0.1:"), proc.stderr
    assert took < 3 + 20
