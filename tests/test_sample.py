"""`bitpipe-fx sample`: greedy bytes are the argmax of the model's own logits (teacher-forced check), seeded
sampling is reproducible, and the command prints what the restored run's model generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitpipe_fx import cli
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples.models import gpt
from bitpipe_fx.train.restore import restore
from bitpipe_fx.train.sample import generate


def test_greedy_tokens_are_the_argmax_of_the_full_sequence_logits():
    model, _ = gpt()  # vocab 128, 16 positions
    prompt = [5, 17, 99, 3]
    ids = generate(model, prompt, 10, context=16)
    assert ids[:4] == prompt and len(ids) == 14
    with torch.no_grad():
        logits = model.eval()(torch.tensor([ids]))[0]
    assert ids[4:] == [int(logits[i - 1].argmax()) for i in range(4, 14)]


def test_sampling_is_seeded_and_the_context_is_bounded():
    model, _ = gpt()
    a = generate(model, [1, 2], 30, context=16, temperature=1.0, seed=3)  # 32 ids: more than 16 positions
    assert a == generate(model, [1, 2], 30, context=16, temperature=1.0, seed=3)
    assert a != generate(model, [1, 2], 30, context=16, temperature=1.0, seed=4)


def test_bad_sampling_arguments_are_refused(capsys):
    model, _ = gpt()
    with pytest.raises(ConfigError, match=r"--temperature must be >= 0 \(0 = greedy\), got -1"):
        generate(model, [1], 3, context=16, temperature=-1)
    assert cli.main(["sample", "nowhere", "--prompt", "x", "--tokens", "0"]) == 2
    assert capsys.readouterr().err.strip() == "bitpipe-fx sample: error: --tokens must be a positive integer, got 0"


@pytest.mark.slow
def test_sample_command_prints_the_restored_models_text(tmp_path):
    run = tmp_path / "run"
    exe = Path(sys.executable).with_name("bitpipe-fx")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "bitpipe_fx.cli"]
    train = ["train", "--arg", "dim=16", "--arg", "layers=2", "--arg", "heads=2", "--devices", "2", "--local",
             "--microbatches", "2", "--batch-size", "4", "--seq-len", "8", "--steps", "2", "--max-bytes", "50000",
             "--eval-batches", "1", "--out", str(run)]
    assert subprocess.run([*command, *train], capture_output=True, timeout=240).returncode == 0
    proc = subprocess.run([*command, "sample", str(run), "--prompt", "def f", "--tokens", "12", "--temperature",
                           "0.7", "--seed", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ids = generate(restore(run).model, list(b"def f"), 12, context=8, temperature=0.7, seed=2)
    assert proc.stdout == bytes(ids).decode("utf-8", errors="replace") + "\n"
