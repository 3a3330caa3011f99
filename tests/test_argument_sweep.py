"""A bad-value sweep (hypothesis) of every public argument of compile(), CompiledPipeline.step / evaluate /
predict, runtime.launch and the `bitpipe-fx train` options: each bad value is a BitPipeError subclass whose
message names it. In-process only (no rank is started), so the sweep stays fast."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitpipe_fx as bp
from bitpipe_fx import cli
from bitpipe_fx.errors import BitPipeError, ConfigError, ScheduleError
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from bitpipe_fx.runtime.launch import launch

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MODEL, EXAMPLE = gpt(dim=16, layers=2, heads=2, vocab=64, seq=8, micro_batch=2)
GOOD = {"model": MODEL, "example_inputs": EXAMPLE, "loss_fn": lm_loss, "schedule": "1f1b", "devices": 2,
        "microbatches": 2}
not_positive_int = st.one_of(st.integers(max_value=0), st.booleans(), st.floats(allow_nan=False), st.text(max_size=3))
not_positive_seconds = st.one_of(st.floats(max_value=0), st.just(math.inf), st.just(math.nan), st.booleans(),
                                 st.text(max_size=3))
not_callable = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2))


def refused(kind: type[BitPipeError], named: str, **changes: object) -> None:
    with pytest.raises(kind) as info:
        bp.compile(**(GOOD | changes))
    assert named in str(info.value), (named, str(info.value))


@FAST
@given(st.sampled_from(["devices", "microbatches", "data_parallel"]), not_positive_int)
def test_compile_counts(name, value):
    refused(ConfigError, f"{name} must be a positive integer, got {value!r}", **{name: value})


@FAST
@given(not_positive_seconds)
def test_compile_timeout(value):
    refused(ConfigError, f"timeout must be a finite number of seconds > 0 (the bound of every wait in a distributed "
                         f"step), got {value!r}", timeout=value)


@FAST
@given(st.one_of(st.integers(max_value=-1), st.booleans(), st.floats(), st.text(max_size=3)))
def test_compile_seed(value):
    refused(ConfigError, f"seed must be a non-negative integer (it keys every micro-batch's random stream), "
                         f"got {value!r}", seed=value)


@FAST
@given(st.text(max_size=8).filter(lambda t: t not in ("raise", "skip")))
def test_compile_on_nonfinite(value):
    refused(ConfigError, f"on_nonfinite must be one of ['raise', 'skip'], got {value!r}", on_nonfinite=value)


@FAST
@given(not_callable)
def test_compile_loss_fn(value):
    refused(ConfigError, f"loss_fn must be a function (model output, targets) -> scalar loss tensor, got {value!r}",
            loss_fn=value)


@FAST
@given(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)))
def test_compile_optimizer(value):
    refused(ConfigError, f"got {type(value).__name__}", optimizer=value)


@FAST
@given(st.one_of(st.integers(), st.text(max_size=5), st.none()))
def test_compile_model_and_example_inputs(value):
    refused(ConfigError, f"model must be a torch.nn.Module, got {type(value).__name__}", model=value)
    if value is not None and not isinstance(value, str):
        refused(ConfigError, f"example_inputs must be ONE micro-batch: a tensor, a tuple of positional inputs or a "
                             f"dict of keyword inputs, got {type(value).__name__}", example_inputs=value)


def test_compile_example_inputs_without_a_tensor():
    refused(ConfigError, "example_inputs (1, 2) hold no tensor", example_inputs=(1, 2))


@FAST
@given(st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2)))
def test_compile_schedule_type(value):
    refused(ConfigError, f"schedule must be a spec string NAME[:key=value,...] such as 'bitpipe' or "
                         f"'interleaved:chunks=2', got {value!r}", schedule=value)


@FAST
@given(st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(
    lambda t: t not in ("auto", "gpipe", "chimera", "bitpipe", "zbv", "dualpipev", "interleaved")))
def test_compile_schedule_name(value):
    refused(ScheduleError, f"unknown schedule {value!r}; choose one of", schedule=value)


@FAST
@given(st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2)))
def test_compile_plan_and_trace_path(value):
    refused(ConfigError, f"plan must be a Plan or the path of one saved by `bitpipe-fx partition`, got "
                         f"{type(value).__name__}", plan=value)
    refused(ConfigError, f"trace_path must be a file path (str or Path) or None, got {value!r}", trace_path=value)


@FAST
@given(st.one_of(st.text(min_size=1, max_size=5), st.lists(st.integers(), min_size=1, max_size=2)))
def test_compile_leaf_modules(value):
    named = f"got {value!r}; wrap a single one" if isinstance(value, str) else f"leaf_modules holds {value[0]!r}"
    refused(ConfigError, named, leaf_modules=value)


@pytest.fixture(scope="module")
def pipe():
    return bp.compile(**GOOD, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))


@FAST
@given(rows=st.integers(min_value=1, max_value=9).filter(lambda r: r != 4))
def test_step_evaluate_predict_batches_of_the_wrong_size(pipe, rows):
    tokens, targets = lm_batch(64, rows, 8)
    for call in (lambda: pipe.step(tokens, targets), lambda: pipe.evaluate(tokens, targets),
                 lambda: pipe.predict(tokens)):
        with pytest.raises(ConfigError) as info:
            call()
        assert "input 'tokens'" in str(info.value) and f"({rows}, 8)" in str(info.value)


@FAST
@given(st.one_of(st.integers(), st.text(max_size=3), st.none()))
def test_step_inputs_of_the_wrong_kind_and_record(pipe, value):
    with pytest.raises(ConfigError, match=f"got {type(value).__name__}"):
        pipe.step(value, None)
    tokens, targets = lm_batch(64, 4, 8)
    with pytest.raises(ConfigError) as info:
        pipe.step(tokens, targets, record=value)
    assert str(info.value) == f"record must be True or False, got {value!r}"
    with pytest.raises(ConfigError, match=r"^targets leaf 0 has shape \(3, 8\) but the inputs have 4 rows"):
        pipe.step(tokens, targets[:3])


@FAST
@given(st.sampled_from(["nprocs", "threads", "timeout", "grace", "join_timeout"]), st.data())
def test_launch_arguments(name, data):
    counts = name in ("nprocs", "threads")
    value = data.draw(not_positive_int if counts else not_positive_seconds)
    kwargs = {"nprocs": 1, name: value}
    with pytest.raises(ConfigError) as info:
        launch(print, **kwargs)
    what = "a positive integer" if counts else "a finite number of seconds > 0"
    assert str(info.value) == f"{name} must be {what}, got {value!r}"


def train(*argv: str) -> int:
    """cli.main's exit status (argparse's usage errors exit through SystemExit)."""
    try:
        return cli.main([*TRAIN, *argv])
    except SystemExit as exc:
        return int(exc.code)


TRAIN = ["train", "--devices", "2", "--microbatches", "2", "--out", "/nonexistent/never-created"]
COUNT_FLAGS = ["--steps", "--devices", "--microbatches", "--data-parallel", "--batch-size", "--eval-batches",
               "--threads", "--max-bytes"]
NONNEGATIVE_FLAGS = ["--warmup", "--save-every", "--eval-every", "--compare-steps", "--seed"]


@FAST
@given(st.sampled_from(COUNT_FLAGS + NONNEGATIVE_FLAGS), st.integers(max_value=-1))
def test_train_integer_options(capsys, flag, value):
    assert train(f"{flag}={value}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and str(value) in err, err


@FAST
@given(st.sampled_from(["--lr", "--weight-decay", "--timeout"]),
       st.one_of(st.floats(max_value=-1e-9), st.just(math.nan), st.just(-math.inf)))
def test_train_number_options(capsys, flag, value):
    assert train(f"{flag}={value!r}") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"bitpipe-fx train: error: {flag} must be"), err


@FAST
@given(st.sampled_from(["--optimizer", "--dtype", "--task", "--schedule", "--model"]),
       st.from_regex(r"[a-z]{3,8}", fullmatch=True).filter(lambda t: t not in ("auto", "gpt", "bert", "lm", "mlm")))
def test_train_name_options(capsys, flag, value):
    assert train(flag, value) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and repr(value) in err, err


@pytest.mark.parametrize("argv", [["--steps", "x"], ["--lr", "fast"], ["--on-nonfinite", "ignore"],
                                  ["--arg", "dims"], ["--record-step", "0"], ["--timeout", "inf"]])
def test_train_malformed_values(capsys, argv):
    assert train(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and argv[1] in err and "Traceback" not in err, err
