"""End to end: `bitpipe-fx train` on 2 local processes writes its files, and --resume continues exactly.

One module-scoped set of runs (each a real `bitpipe-fx train` command spawning 2 gloo processes, dropout 0.1):
``part`` trains 3 steps and is resumed to 6; ``whole`` trains 6 steps in one go.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitpipe_fx.plan import Plan
from bitpipe_fx.schedules import generate
from bitpipe_fx.sim import read_chrome_trace

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ARGS = ["--arg", "dim=32", "--arg", "layers=2", "--arg", "heads=2", "--arg", "dropout=0.1", "--devices", "2",
        "--microbatches", "4", "--batch-size", "8", "--seq-len", "16", "--lr", "1e-2", "--warmup", "0",
        "--eval-every", "2", "--eval-batches", "2", "--save-every", "2", "--max-bytes", "400000", "--seed", "7"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("bitpipe-fx")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "bitpipe_fx.cli"]


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*_cli(), "train", *ARGS, "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    first = _train(root / "part", "--steps", "3")
    metrics_3 = json.loads((root / "part" / "metrics.json").read_text())
    resumed = _train(root / "part", "--steps", "6", "--resume")
    _train(root / "whole", "--steps", "6")
    return {"root": root, "first": first, "metrics_3": metrics_3, "resumed": resumed}


def test_run_writes_every_file_and_the_loss_decreases(runs):
    out = runs["root"] / "part"
    for name in ("plan.json", "loss.png", "timeline.png", "timeline.json", "timeline_predicted.json",
                 "metrics.json", "checkpoint/latest.json"):
        assert (out / name).is_file(), name
    losses = runs["metrics_3"]["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "2 local processes" in runs["first"].stdout and "bubble" in runs["first"].stdout


def test_plan_round_trips_and_is_the_schedules_program(runs):
    path = runs["root"] / "part" / "plan.json"
    plan = Plan.load(path)
    assert plan.to_json() == path.read_text()
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.program == generate("bitpipe", 2, 4)
    assert (plan.schedule, plan.devices, plan.microbatches, plan.num_stages) == ("bitpipe", 2, 4, 4)


def test_trace_holds_every_action_of_the_plan_in_program_order(runs):
    out = runs["root"] / "part"
    program = Plan.load(out / "plan.json").program
    events = read_chrome_trace(out / "timeline.json")
    for d in range(program.devices):
        actions = program.actions(d)
        compute = sorted((e for e in events if e.device == d and e.kind in "FBIW"), key=lambda e: e.start)
        assert [e.name for e in compute] == [str(a) for a in actions if a.kind != "SYNC"]
        assert all(e.end >= e.start >= 0 for e in compute)
        synced = {e.stage for e in events if e.device == d and e.kind == "SYNC"}
        assert {a.stage for a in actions if a.kind == "SYNC"} <= synced
    predicted = read_chrome_trace(out / "timeline_predicted.json")
    assert {e.name for e in predicted if e.kind in "FBIW"} == {e.name for e in events if e.kind in "FBIW"}


def test_resume_continues_with_the_losses_of_an_uninterrupted_run(runs):
    root = runs["root"]
    part = json.loads((root / "part" / "metrics.json").read_text())
    whole = json.loads((root / "whole" / "metrics.json").read_text())
    assert len(whole["losses"]) == 6
    assert part["losses"][:3] == runs["metrics_3"]["losses"]
    assert part["losses"] == whole["losses"]  # bit-identical, steps 4-6 included
    assert part["val"] == whole["val"] and [s for s, _ in whole["val"]] == [2, 4, 6]
    assert json.loads((root / "part" / "checkpoint" / "latest.json").read_text())["step"] == 6
    assert "steps 4..6" in runs["resumed"].stdout


def test_example_script_in_one_process_matches_the_non_pipelined_reference(tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "train.py"
    proc = subprocess.run([sys.executable, str(script), *ARGS, "--steps", "2", "--local", "--compare-steps", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reference = json.loads((tmp_path / "metrics.json").read_text())["reference"]
    assert reference["agree"] and len(reference["reference"]) == 2
    assert reference["max_rel_diff"] <= 1e-4
    assert "losses agree" in proc.stdout
    assert "in one process (--local) running the 2 devices one after another" in proc.stdout
    assert "  device 1: compute " in proc.stdout


def test_bert_with_dropout_matches_the_non_pipelined_reference_in_float64(tmp_path):
    proc = _train(tmp_path, "--model", "bert", "--dtype", "float64", "--steps", "3", "--compare-steps", "3",
                  "--schedule", "bitpipe")
    reference = json.loads((tmp_path / "metrics.json").read_text())["reference"]
    assert reference["agree"] and len(reference["reference"]) == 3
    assert reference["max_rel_diff"] <= 1e-12, reference
    assert "losses agree" in proc.stdout


def test_a_non_finite_step_stops_the_run_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    args = [*_cli(), "train", *ARGS, "--steps", "4", "--save-every", "1", "--lr", "1e30"]
    proc = subprocess.run([*args, "--out", str(tmp_path / "raise")], capture_output=True, text=True, timeout=240,
                          env=ENV)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "NonFiniteError" in lines[0] and "step 2: non-finite loss in micro-batch" in lines[0]
    latest = json.loads((tmp_path / "raise" / "checkpoint" / "latest.json").read_text())
    assert latest["step"] == 1 and not (tmp_path / "raise" / "checkpoint" / "step-000002").exists()
    proc = subprocess.run([*args, "--local", "--on-nonfinite", "skip", "--out", str(tmp_path / "skip")],
                          capture_output=True, text=True, timeout=240, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "skip" / "metrics.json").read_text())["skipped_steps"] == [2, 3, 4]


def test_bf16_mixed_run_trains_and_agrees_with_the_fp32_reference_loosely(tmp_path):
    proc = _train(tmp_path, "--steps", "3", "--compare-steps", "3", "--precision", "bf16-mixed")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["precision"] == "bf16-mixed"
    reference = metrics["reference"]
    assert reference["agree"] and 0 < reference["max_rel_diff"] <= 5e-2, reference  # bf16 compute: not exact
    assert "losses agree" in proc.stdout and "tolerance 5e-02" in proc.stdout
