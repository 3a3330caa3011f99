"""Pieces of the training job that need no processes: config resolution, checkpoints, reports."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.schedules import generate
from bitpipe_fx.sim import CostModel, read_chrome_trace, simulate
from bitpipe_fx.train import checkpoint
from bitpipe_fx.train.checkpoint import History
from bitpipe_fx.train.job import TrainConfig, build_model, resolve, resume_mismatch
from bitpipe_fx.train.report import bubble, compare_timelines, plot_losses, write_timeline_files

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
    for rank in range(cfg.processes):
        checkpoint.save_rank(cfg.out, step, rank, {"rank": rank, "t": torch.arange(3)})
    checkpoint.commit(cfg.out, step, cfg, History([5.0, 4.0], [10.0, 11.0], [(2, 4.5)]))


def test_checkpoint_commit_and_resume(tmp_path):
    cfg = replace(TINY, out=str(tmp_path), lr=3e-3, task="lm", eval_every=2)
    _checkpoint(cfg, 1)
    _checkpoint(cfg, 2)
    assert sorted(p.name for p in checkpoint.directory(cfg.out).iterdir()) == ["latest.json", "step-000002"]
    step, history = checkpoint.check_resume(cfg)
    assert step == 2 and history == History([5.0, 4.0], [10.0, 11.0], [(2, 4.5)])
    state = checkpoint.load_rank(cfg.out, 2, 1)
    assert state["rank"] == 1 and torch.equal(state["t"], torch.arange(3))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 1}, "--resume: seed is 1 but the checkpoint was trained with 0"),
        ({"steps": 2}, "the checkpoint is at step 2 already; pass --steps > 2"),
        ({"devices": 4, "microbatches": 4}, "devices is 4 but the checkpoint was trained with 2"),
    ],
)
def test_resume_refuses_an_incompatible_run(tmp_path, change, message):
    cfg = replace(TINY, out=str(tmp_path), lr=3e-3, task="lm", eval_every=2)
    _checkpoint(cfg, 2)
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        checkpoint.check_resume(replace(cfg, **change))


def test_resume_refuses_a_changed_rex_horizon_and_an_incomplete_checkpoint(tmp_path):
    cfg = replace(TINY, out=str(tmp_path), lr=3e-3, task="lm", eval_every=2, optimizer="adamw-rex")
    _checkpoint(cfg, 2)
    with pytest.raises(ConfigError, match="adamw-rex's learning-rate profile spans the run's --steps 20"):
        checkpoint.check_resume(replace(cfg, steps=40))
    checkpoint.rank_file(cfg.out, 2, 1).unlink()
    with pytest.raises(ConfigError, match=r"rank1\.pt is missing; the checkpoint is incomplete"):
        checkpoint.check_resume(cfg)


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
