"""Wrong arguments to `bitpipe-fx train` / `demo`: one clear line on stderr, exit status 2, no process started."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitpipe_fx import cli

TINY = ["--arg", "dim=16", "--arg", "layers=2", "--arg", "heads=2", "--devices", "2", "--microbatches", "2",
        "--batch-size", "4", "--seq-len", "8", "--steps", "2"]


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if any process would be started or any plan built."""
    import bitpipe_fx.compiler

    launch_module = importlib.import_module("bitpipe_fx.runtime.launch")  # the package re-exports the function

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(launch_module, "launch", refuse)
    monkeypatch.setattr(bitpipe_fx.compiler, "build_plan", refuse)


CASES = [
    (["--schedule", "zigzag"], "unknown schedule 'zigzag'; choose one of"),
    (["--schedule", "bitpipe", "--devices", "3"], "bitpipe needs an even number of devices, got devices=3"),
    (["--devices", "4", "--microbatches", "6"], "multiple of devices=4, got microbatches=6"),
    (["--data", "/nonexistent/corpus.txt"], "corpus path '/nonexistent/corpus.txt' does not exist"),
    ([*TINY, "--batch-size", "5"], "--batch-size 5 is not a multiple of microbatches x data-parallel = 2"),
    (["--optimizer", "adam"], "optimizer 'adam' is unknown; use one of sf-adamw, sf-sgd, adamw-rex"),
    (["--model", "gpt3"], "model 'gpt3' is unknown; use gpt, bert, or MODULE:FACTORY"),
    (["--model", "no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
    ([*TINY, "--model", "bitpipe_fx.examples.models:gpt", "--seq-len", "32"], "make them agree"),
    ([*TINY, "--task", "mlm"], "task 'mlm' needs (tokens, attention_mask) example inputs"),
    ([*TINY, "--dtype", "float16"], "dtype 'float16' is not supported"),
    ([*TINY, "--local", "--data-parallel", "2", "--batch-size", "8"], "--local runs every device in one process"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    ([*TINY, "--precision", "fp16"], "--precision must be one of fp32, bf16-mixed, got 'fp16'"),
    ([*TINY, "--precision", "bf16-mixed", "--dtype", "float64"], "--precision bf16-mixed keeps float32 master"),
    (["--recompute", "sometimes"], "--recompute must be one of none, full, auto, got 'sometimes'"),
    (["--recompute", "auto"], "--recompute auto needs --memory-limit"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[c[1][:30] for c in CASES])
def test_wrong_arguments_get_one_line_and_exit_2(argv, message, tmp_path, capsys, no_launch):
    rc = cli.main(["train", *argv, "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.startswith("bitpipe-fx train: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert message in err
    assert out == ""


def test_resume_without_a_checkpoint_names_the_folder(tmp_path, capsys, no_launch):
    rc = cli.main(["train", *TINY, "--out", str(tmp_path / "fresh"), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"--resume: no checkpoint in {tmp_path / 'fresh' / 'checkpoint'}" in err


def test_torchrun_world_size_must_match_devices(tmp_path, capsys, monkeypatch, no_launch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    rc = cli.main(["train", *TINY, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "torchrun started 3 processes but --devices 2 x --data-parallel 1 needs 2" in err


def test_demo_checks_its_arguments_too(tmp_path, capsys, no_launch):
    rc = cli.main(["demo", "--devices", "5", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and err == "bitpipe-fx demo: error: bitpipe needs an even number of devices, got devices=5; " \
                              "use 4 or 6\n"


def test_console_script_prints_one_line_and_no_traceback(tmp_path):
    exe = Path(sys.executable).with_name("bitpipe-fx")
    command = [str(exe)] if exe.exists() else [shutil.which("bitpipe-fx") or "bitpipe-fx"]
    proc = subprocess.run([*command, "train", "--schedule", "zigzag", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("bitpipe-fx train: error: unknown schedule 'zigzag'")
    assert not (tmp_path / "o").exists()  # refused before the output folder was made


def test_an_adamw_rex_run_past_its_horizon_stops_before_launch_with_what_to_do(tmp_path):
    exe = Path(sys.executable).with_name("bitpipe-fx")
    command = [str(exe)] if exe.exists() else [shutil.which("bitpipe-fx") or "bitpipe-fx"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "rex"
    base = [*command, "train", *TINY, "--optimizer", "adamw-rex", "--max-bytes", "100000", "--local",
            "--out", str(out)]
    first = subprocess.run(base, capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = subprocess.run([*base, "--resume", "--steps", "4"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"bitpipe-fx train: error: --resume: the adamw-rex run in {out} ended at its learning-rate horizon, step 2 "
        "(REX decays the lr to 0 there), and cannot be extended; to train 4 steps with adamw-rex, start a new run "
        "with --steps 4 (another --out, or --overwrite), or use sf-adamw / sf-sgd, which have no horizon\n")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written or removed
