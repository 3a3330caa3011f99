"""Pieces of the training job that need no processes: config resolution, checkpoints, reports."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.schedules import generate
from bitpipe_fx.sim import CostModel, read_chrome_trace, simulate
from bitpipe_fx.train import checkpoint
from bitpipe_fx.train.checkpoint import History
from bitpipe_fx.train.job import TrainConfig, build_model, resolve, resume_mismatch
from bitpipe_fx.train.report import bubble, compare_timelines, plot_losses, write_timeline_files

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

TINY = TrainConfig(model_args=(("dim", 16), ("heads", 2), ("layers", 2)), devices=2, microbatches=2, batch_size=4,
                   seq_len=8, steps=20)


def test_resolve_fills_the_defaults_from_the_model_and_the_optimizer():
    model, example = build_model(TINY)
    cfg = resolve(TINY, example)
    assert (cfg.task, cfg.batch_size, cfg.seq_len, cfg.lr, cfg.eval_every) == ("lm", 4, 8, 3e-3, 2)
    assert example[0].shape == (2, 8) and model.tok_emb.num_embeddings == 256
    bert = resolve(replace(TINY, model="bert", optimizer="sf-sgd"), build_model(replace(TINY, model="bert"))[1])
    assert (bert.task, bert.lr) == ("mlm", 0.5)
    factory = replace(TINY, model="bitpipe_fx.examples.models:gpt", model_args=(), batch_size=None, seq_len=None)
    derived = resolve(factory, build_model(factory)[1])  # the factory's own micro-batch (2 x 16) sets the shape
    assert (derived.batch_size, derived.seq_len) == (4, 16)


def test_float64_runs_build_a_float64_model():
    model, _ = build_model(replace(TINY, dtype="float64"))
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_config_round_trips_through_its_dict_and_names_the_first_difference():
    cfg = replace(TINY, schedule_options=(("chunks", 2),), lr=1e-3)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert resume_mismatch(cfg, replace(cfg, steps=99, out="elsewhere")) is None
    assert resume_mismatch(cfg, replace(cfg, lr=2e-3)) == "lr is 0.002 but the checkpoint was trained with 0.001"


def _checkpoint(cfg: TrainConfig, step: int) -> None:
    """What the ranks and rank 0 do at a save, with a stand-in state."""
    partial = checkpoint.partial_dir(cfg.out, step)
    dcp.save({"t": torch.arange(3) + step}, checkpoint_id=str(partial), no_dist=True)
    checkpoint.commit(cfg.out, step, cfg, History([5.0, 4.0], [10.0, 11.0], [(2, 4.5)]))


def test_checkpoint_commit_keeps_two_verified_steps_and_resumes(tmp_path):
    cfg = replace(TINY, out=str(tmp_path), lr=3e-3, task="lm", eval_every=2)
    for step in (1, 2, 3):
        _checkpoint(cfg, step)
    assert sorted(p.name for p in checkpoint.directory(cfg.out).iterdir()) == [
        "latest.json", "step-000002", "step-000003"]
    assert {p.name for p in checkpoint.step_dir(cfg.out, 3).iterdir()} == {
        ".metadata", "__0_0.distcp", "meta.json", "manifest.json"}
    assert checkpoint.damage(cfg.out, 3) is None
    step, history = checkpoint.check_resume(cfg)
    assert step == 3 and history == History([5.0, 4.0], [10.0, 11.0], [(2, 4.5)])
    assert checkpoint.check_resume(replace(cfg, resume_from=2))[0] == 2
    loaded = {"t": torch.empty(3, dtype=torch.long)}
    dcp.load(loaded, checkpoint_id=str(checkpoint.step_dir(cfg.out, 3)), no_dist=True)
    assert torch.equal(loaded["t"], torch.arange(3) + 3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 1}, "--resume: seed is 1 but the checkpoint was trained with 0"),
        ({"steps": 2}, "the checkpoint is at step 2 already; pass --steps > 2"),
        ({"microbatches": 4, "batch_size": 8}, "microbatches is 4 but the checkpoint was trained with 2"),
    ],
)
def test_resume_refuses_an_incompatible_run(tmp_path, change, message):
    cfg = replace(TINY, out=str(tmp_path), lr=3e-3, task="lm", eval_every=2)
    _checkpoint(cfg, 2)
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        checkpoint.check_resume(replace(cfg, **change))


def test_resume_accepts_another_schedule_and_device_count(tmp_path):
    cfg = replace(TINY, out=str(tmp_path), lr=3e-3, task="lm", eval_every=2)
    _checkpoint(cfg, 2)
    assert checkpoint.check_resume(replace(cfg, schedule="1f1b", devices=4, data_parallel=1))[0] == 2


def test_resume_refuses_a_changed_rex_horizon(tmp_path):
    cfg = replace(TINY, out=str(tmp_path), lr=3e-3, task="lm", eval_every=2, optimizer="adamw-rex")
    _checkpoint(cfg, 2)
    with pytest.raises(ConfigError) as info:
        checkpoint.check_resume(replace(cfg, steps=40))
    assert str(info.value) == (
        "--resume: adamw-rex's learning-rate profile spans the run's --steps 20 (its horizon, fixed at the start); "
        "resume with --steps 20, or, to train 40 steps with adamw-rex, start a new run with --steps 40 (another "
        "--out, or --overwrite), or use sf-adamw / sf-sgd, which have no horizon")
    assert checkpoint.check_resume(cfg)[0] == 2  # up to its own horizon it continues


@pytest.mark.parametrize("harm", ["truncate", "flip", "delete", "manifest"])
def test_a_damaged_latest_checkpoint_is_refused_naming_the_file_and_the_last_good_step(tmp_path, harm):
    cfg = replace(TINY, out=str(tmp_path), lr=3e-3, task="lm", eval_every=2)
    _checkpoint(cfg, 1)
    _checkpoint(cfg, 2)
    folder = checkpoint.step_dir(cfg.out, 2)
    data = folder / "__0_0.distcp"
    size = data.stat().st_size
    if harm == "truncate":
        data.write_bytes(data.read_bytes()[:-7])
        why = f"{data} has {size - 7} bytes, the manifest says {size}"
    elif harm == "flip":
        raw = bytearray(data.read_bytes())
        raw[size // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        why = f"{data} does not match its SHA-256 in the manifest"
    elif harm == "delete":
        data.unlink()
        why = f"{data} is missing"
    else:
        (folder / "manifest.json").write_text("{")
        why = f"{folder / 'manifest.json'} is missing or damaged"
    with pytest.raises(ConfigError) as err:
        checkpoint.check_resume(cfg)
    assert str(err.value).startswith(f"--resume: the checkpoint of step 2 is damaged: {why}")
    assert str(err.value).endswith("; the last good checkpoint is step 1 (--resume-from 1)")
    assert checkpoint.check_resume(replace(cfg, resume_from=1))[0] == 1


def test_resume_from_a_step_that_was_not_saved_lists_the_saved_ones(tmp_path):
    cfg = replace(TINY, out=str(tmp_path), lr=3e-3, task="lm", eval_every=2)
    _checkpoint(cfg, 1)
    _checkpoint(cfg, 2)
    with pytest.raises(ConfigError, match=r"--resume-from 7: no checkpoint folder .*step-000007; saved steps are "
                                          r"\[2, 1\]"):
        checkpoint.check_resume(replace(cfg, resume_from=7))


@pytest.mark.parametrize("cost", [CostModel(forward=1, backward=2),
                                  CostModel(forward=1, backward=3, param_bytes=50.0, allreduce_bandwidth=10.0)])
def test_bubble_of_a_timeline_matches_the_simulators_report(cost):
    report = simulate(generate("bitpipe", 4, 8), cost)
    makespan, ratio = bubble(report.events, 4)
    assert makespan == pytest.approx(report.makespan) and ratio == pytest.approx(report.bubble_ratio)


def test_prediction_is_scaled_to_the_measured_compute(tmp_path):
    program = generate("bitpipe", 2, 4)
    cost = CostModel(forward=(1.0, 1.5, 1.5, 1.0), backward=(2.0, 3.0, 3.0, 2.0))
    plan = SimpleNamespace(program=program, cost_model=lambda: cost)
    sim = simulate(program, cost)
    # a "measured" step that is the simulation itself in milliseconds, starting at t = 5 s
    measured = [replace(e, start=5 + e.start * 1e-3, end=5 + e.end * 1e-3) for e in sim.events]
    timeline = compare_timelines(plan, measured, step=3)
    assert timeline.measured_makespan == pytest.approx(sim.makespan * 1e-3)
    assert timeline.predicted_makespan == pytest.approx(timeline.measured_makespan)
    assert timeline.predicted_bubble == pytest.approx(timeline.measured_bubble) == pytest.approx(sim.bubble_ratio)
    assert min(e.start for e in timeline.measured) == 0.0
    files = write_timeline_files(tmp_path, timeline, {"schedule": "bitpipe"})
    assert [f.name for f in files] == ["timeline.json", "timeline_predicted.json", "timeline.png"]
    back = read_chrome_trace(tmp_path / "timeline.json")
    assert sorted((e.device, e.name) for e in back) == sorted((e.device, e.name) for e in timeline.measured)
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bubble" in timeline.describe()


def test_loss_plot_is_a_png(tmp_path):
    path = plot_losses(tmp_path / "loss.png", [5.0, 4.0, 3.5, 3.0], [(2, 4.1), (4, 3.2)], "tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_more_cpu_processes_than_cores_is_explained_and_the_demo_says_why_it_keeps_d():
    from bitpipe_fx.train.command import cores_note

    demo = cores_note(4, 4, 2, "gloo", "demo")
    assert demo is not None and "4 processes on 2 CPU cores take turns" in demo
    assert "the demo keeps D=4" in demo and "--devices 2 fits this machine" in demo
    train = cores_note(2, 4, 3, "gloo", "train")
    assert train is not None and "fewer processes (--devices, --data-parallel)" in train and "demo" not in train
    assert cores_note(4, 4, 4, "gloo", "demo") is None  # a core each
    assert cores_note(4, 4, 2, "nccl", "demo") is None  # GPU ranks do not share the CPU's cores this way
