"""SIGTERM / SIGINT to the `bitpipe-fx train` launcher (the real console script): every rank stops within the
launcher's stated bound, the exit code and the one stderr line say so, and the last checkpoint resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitpipe_fx.runtime.launch import STOP_BOUND

EXE = Path(sys.executable).with_name("bitpipe-fx")
TINY = ["--arg", "dim=16", "--arg", "layers=2", "--arg", "heads=2", "--devices", "2", "--microbatches", "2",
        "--batch-size", "4", "--seq-len", "8", "--max-bytes", "200000", "--eval-every", "1000"]


def children(pid: int) -> set[int]:
    """Every descendant process of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize(("sig", "code", "line"), [
    (signal.SIGTERM, 143, "bitpipe-fx train: terminated (SIGTERM); every rank was stopped, what was already saved "
                          "is kept\n"),
    (signal.SIGINT, 130, "bitpipe-fx train: interrupted (Ctrl-C); what was already saved is kept\n"),
])
def test_a_signal_to_the_launcher_stops_every_rank_and_the_checkpoint_resumes(tmp_path, sig, code, line):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([str(EXE), "train", *TINY, "--steps", "100000", "--save-every", "1", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not list(out.glob("checkpoint/step-*/manifest.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)
    ranks = children(proc.pid)
    assert len(ranks) >= 2
    proc.send_signal(sig)  # to the launcher only, not its process group
    sent = time.monotonic()
    _, err = proc.communicate(timeout=STOP_BOUND + 30)
    assert proc.returncode == code and err == line, err
    while any(alive(r) for r in ranks) and time.monotonic() - sent < STOP_BOUND + 5:
        time.sleep(0.1)
    assert not [r for r in ranks if alive(r)], "a rank outlived the launcher"
    steps = sorted(int(p.parent.name.split("-")[1]) for p in out.glob("checkpoint/step-*/manifest.json"))
    resumed = subprocess.run([str(EXE), "train", *TINY, "--steps", str(steps[-1] + 1), "--save-every", "1",
                              "--resume", "--local", "--out", str(out)], capture_output=True, text=True, env=env,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"steps {steps[-1] + 1}..{steps[-1] + 1}" in resumed.stdout
