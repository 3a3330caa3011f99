"""CLI conventions through the real console script: one schedule spec everywhere, one-line errors with their
exit codes, run-folder safety, --version / python -m, and the settings refused before any process starts."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import bitpipe_fx as bp
from bitpipe_fx import cli
from bitpipe_fx.errors import ConfigError, ScheduleError
from bitpipe_fx.examples.models import gpt, lm_loss
from bitpipe_fx.train.trainer import tag_warnings

EXE = Path(sys.executable).with_name("bitpipe-fx")
TINY = ["--arg", "dim=16", "--arg", "layers=2", "--arg", "heads=2", "--devices", "2", "--microbatches", "2",
        "--batch-size", "4", "--seq-len", "8", "--steps", "2", "--max-bytes", "200000"]
GPT = "bitpipe_fx.examples.models:gpt"


def console(*argv: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(EXE), *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def error_of(proc: subprocess.CompletedProcess, command: str) -> str:
    """The message of a one-line error of ``bitpipe-fx COMMAND``, checking the line's shape."""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    prefix = f"bitpipe-fx {command}: error: "
    assert proc.stderr.startswith(prefix), proc.stderr
    return proc.stderr[len(prefix):].rstrip("\n")


def api_error(**kwargs: object) -> str:
    model, example = gpt()
    with pytest.raises(ScheduleError) as info:
        bp.compile(model, example, lm_loss, devices=2, microbatches=4, **kwargs)
    return str(info.value)


@pytest.mark.parametrize(("spec", "message"), [
    ("interleaved:chunkz=2", "schedule 'interleaved' has no option 'chunkz'; its options are chunks (int)"),
    ("zigzag", "unknown schedule 'zigzag'; choose one of 1f1b, bitpipe, bitpipe-paper, chimera, dualpipev, gpipe, "
               "interleaved, zbv"),
])
def test_schedule_spec_errors_are_identical_at_all_five_entry_points(spec, message, tmp_path):
    seen = {"compile": api_error(schedule=spec)}
    for command, argv in (("train", ["train", "--schedule", spec, "--out", str(tmp_path / "o")]),
                          ("simulate", ["simulate", "--schedules", spec]),
                          ("inspect", ["inspect", GPT, "--schedule", spec]),
                          ("partition", ["partition", GPT, "--schedule", spec, "--out", str(tmp_path / "p.json")])):
        proc = console(*argv)
        assert proc.returncode == 2 and proc.stdout == ""
        seen[command] = error_of(proc, command)
    assert set(seen.values()) == {message}, seen
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.json").exists()


def test_schedule_option_as_keyword_or_in_the_spec_is_the_same_plan():
    model, example = gpt()
    a = bp.compile(model, example, lm_loss, "interleaved:chunks=2", 2, 4).plan
    b = bp.compile(model, example, lm_loss, "interleaved", 2, 4, chunks=2).plan
    assert (a.schedule, a.schedule_options) == (b.schedule, b.schedule_options) == ("interleaved", {"chunks": 2})
    assert a.program == b.program and a.num_stages == 4
    assert api_error(schedule="interleaved", chunkz=2) == \
        "schedule 'interleaved' has no option 'chunkz'; its options are chunks (int)"
    assert api_error(schedule="interleaved:chunks=two") == \
        "option chunks of schedule 'interleaved' takes int, got 'two'"
    assert api_error(schedule="interleaved:chunks=2", chunks=3) == \
        "schedule option chunks is 2 in 'interleaved:chunks=2' but 3 as a keyword; give it once"


def test_compile_with_a_plan_refuses_conflicting_arguments_naming_both(tmp_path):
    model, example = gpt(layers=4)
    plan = bp.inspect(model, example, "1f1b", 2, 4)
    for kwargs, message in (
        ({"schedule": "bitpipe"}, "schedule 'bitpipe' conflicts with the plan's schedule '1f1b'"),
        ({"devices": 4}, "devices=4 conflicts with the plan's devices=2"),
        ({"microbatches": 8}, "microbatches=8 conflicts with the plan's microbatches=4"),
    ):
        with pytest.raises(ConfigError, match=f"^{message}; drop"):
            bp.compile(model, example, lm_loss, plan=plan, **kwargs)
    pipe = bp.compile(model, example, lm_loss, "1f1b", 2, 4, plan=plan)  # the same values are fine
    assert pipe.plan.to_json() == plan.to_json()


def test_a_partition_compile_mismatch_names_the_factory_arguments_that_differ(tmp_path):
    proc = console("partition", GPT, "--arg", "layers=4", "--schedule", "1f1b", "--devices", "2",
                   "--out", str(tmp_path / "p.json"))
    assert proc.returncode == 0, proc.stderr
    model, example = gpt(layers=6, seq=32)
    with pytest.raises(ConfigError) as info:
        bp.compile(model, example, lm_loss, plan=tmp_path / "p.json")
    text = str(info.value)
    assert text.startswith("the plan was made for a different graph (plan ")
    assert ("this model differs: layers=4 in the plan, 6 here; seq=16 in the plan, 32 here; input 0: (2, 16) int64 "
            "in the plan, (2, 32) int64 here; the plan was made by `bitpipe-fx partition "
            "bitpipe_fx.examples.models:gpt --arg layers=4`") in text


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_holding_a_run_is_refused_and_left_byte_identical(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--local", "--out", str(out)]) == 0
    capsys.readouterr()
    before = tree(out)
    assert {"plan.json", "metrics.json", "checkpoint/latest.json", "checkpoint/step-000002/manifest.json"} \
        <= set(before)
    proc = console("train", *TINY, "--local", "--out", str(out))
    assert proc.returncode == 2 and proc.stdout == ""
    assert error_of(proc, "train") == (
        f"--out {out} already holds a run (checkpoint, plan.json, metrics.json, loss.png, timeline.png, "
        "timeline.json, timeline_predicted.json); pass --resume to continue it or --overwrite to replace it "
        "(or choose another --out)")
    assert tree(out) == before
    (out / "notes.txt").write_text("mine")
    assert cli.main(["train", *TINY, "--local", "--steps", "1", "--out", str(out), "--overwrite"]) == 0
    after = tree(out)
    assert "checkpoint/step-000002/manifest.json" not in after and "checkpoint/step-000001/manifest.json" in after
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    assert cli.main(["train", *TINY, "--local", "--out", str(out), "--resume", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "--resume continues the run in --out and --overwrite replaces it; pass one of them" in err


def test_settings_that_ranks_would_refuse_are_refused_before_launch(tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"PK\x03\x04\x00\x00" + bytes(range(256)) * 8)
    cases = [
        (["--arg", "vocab=100"], "the model's vocabulary has 100 tokens but Python "),
        (["--weight-decay", "-0.1"], "--weight-decay must be a number >= 0, got -0.1"),
        (["--record-step", "5"], "--record-step 5 is not a step of this run; pass a step in 1..2 (--steps)"),
        (["--data", str(binary)], f"--data {str(binary)!r} is not a text file (it has NUL bytes in its first 8 KiB)"),
    ]
    for extra, message in cases:
        proc = console("train", *TINY, *extra, "--out", str(tmp_path / "o"))
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert error_of(proc, "train").startswith(message), proc.stderr
    assert "it needs at least" in console("train", *TINY, "--arg", "vocab=100", "--out", str(tmp_path / "o")).stderr
    assert not (tmp_path / "o").exists()


def test_an_unexpected_failure_is_one_line_exit_1_and_debug_shows_the_traceback(tmp_path):
    factory = tmp_path / "broken.py"
    factory.write_text("def make():\n    raise RuntimeError('the factory broke')\n")
    argv = ["train", "--model", f"{factory}:make", "--out", str(tmp_path / "o")]
    proc = console(*argv)
    assert proc.returncode == 1
    assert proc.stderr == ("bitpipe-fx train: failed: RuntimeError: the factory broke "
                           "(run with --debug for the traceback)\n")
    debug = console(*argv, "--debug")
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.endswith("bitpipe-fx train: failed: RuntimeError: the factory broke\n")


def test_usage_errors_are_one_line_with_exit_2():
    proc = console("train", "--steps", "many")
    assert proc.returncode == 2
    assert error_of(proc, "train") == ("argument --steps: invalid int value: 'many' "
                                       "(see `bitpipe-fx train --help`)")


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    argv = [str(EXE), "train", *TINY, "--steps", "100000", "--eval-every", "1", "--local", "--out", str(tmp_path / "o")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    while not proc.stdout.readline().startswith("step "):  # training has started
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "bitpipe-fx train: interrupted (Ctrl-C); what was already saved is kept\n"


def test_version_python_m_and_help():
    assert console("--version").stdout == f"bitpipe-fx {bp.__version__}\n"
    module = subprocess.run([sys.executable, "-m", "bitpipe_fx", "simulate", "-d", "2", "-n", "4", "--schedules",
                             "1f1b"], capture_output=True, text=True, timeout=60)
    assert module.returncode == 0 and "| 1f1b " in module.stdout
    top = console("--help").stdout
    for name, (_, line) in cli.COMMANDS.items():
        assert name in top and " ".join(line.split()[:4]) in " ".join(top.split())
    train = " ".join(console("train", "--help").stdout.split())
    assert "pipeline devices D (default: 4)" in train and "optimizer steps in total (default: 200)" in train
    assert "--overwrite" in train
    sim = " ".join(console("simulate", "--help").stdout.split())
    assert "pipeline devices D (default: 8)" in sim


def test_warnings_of_other_ranks_carry_their_rank(monkeypatch):
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    plain = warnings.formatwarning("slow", UserWarning, "f.py", 3)
    tag_warnings(0)
    assert warnings.formatwarning("slow", UserWarning, "f.py", 3) == plain
    tag_warnings(2)
    assert warnings.formatwarning("slow", UserWarning, "f.py", 3) == f"[rank 2] {plain}"


def test_under_torchrun_the_error_line_of_another_rank_names_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "--schedule", "zigzag", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("bitpipe-fx train [rank 1]: error: unknown schedule 'zigzag'; ")
