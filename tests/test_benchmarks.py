"""Benchmarks: each script runs with --smoke and writes the JSON and markdown it promises; helpers checked alone.

Nothing here times anything: the checks are on counts, structure and numerics that do not depend on speed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitpipe_fx.schedules import SCHEDULES

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name: str):
    """Import benchmarks/<name>.py as a module (the scripts import their sibling ``_common``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules[key]


def _run(script: str, out: Path, *extra: str, timeout: float = 240) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = script.removesuffix(".py")
    assert (out / f"{name}.md").read_text().startswith("## ")
    return json.loads((out / f"{name}.json").read_text())


# ---- _common ------------------------------------------------------------------------------------


def test_markdown_table_formats_cells_and_marks_missing_ones():
    common = _load("_common")
    cols = [common.Column("a", "A"), common.Column("x", "X", ".2f")]
    text = common.markdown_table([{"a": "one", "x": 1.234}, {"a": "two"}], cols)
    assert text.splitlines() == ["| A | X |", "|---|---|", "| one | 1.23 |", "| two | - |"]


def test_write_results_round_trips_json(tmp_path):
    common = _load("_common")
    json_path, md_path = common.write_results(tmp_path / "r", "x", {"a": (1, 2), "p": Path("/q")}, "| t |")
    assert json.loads(json_path.read_text()) == {"a": [1, 2], "p": "/q"}
    assert md_path.read_text() == "| t |\n"


def test_peak_memory_sees_a_large_allocation():
    common = _load("_common")
    torch = pytest.importorskip("torch")
    common.reset_peak_memory()
    kind, before = common.peak_memory()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # what peak_memory() watches
    block = torch.ones(64 * 2**20 // 4, device=device)  # 64 MiB, touched
    _, after = common.peak_memory()
    del block
    assert kind in ("rss_high_water", "rss_high_water_lifetime", "cuda_max_allocated")
    assert after - before >= 48 * 2**20


# ---- schedules.py --------------------------------------------------------------------------------


def test_stash_replay_matches_the_simulators_activation_count():
    """With one stash size c for every stage, the replayed peak bytes equal c x the simulator's peak units."""
    sched = _load("schedules")
    from bitpipe_fx.passes import StageCost
    from bitpipe_fx.schedules import generate
    from bitpipe_fx.sim import CostModel, simulate

    for name in ("1f1b", "zbv", "bitpipe", "gpipe", "dualpipev"):  # dualpipev mixes B with I/W
        program = generate(name, 4, 8)
        report = simulate(program, CostModel(forward=1.0, backward=2.0))
        rows = tuple(StageCost(s, 1, 0, 0, 0, 1000, 0, "a", "b") for s in range(program.stages))
        assert sched.peak_stash_bytes(report, rows) == 1000 * max(report.peak_activation_units), name


def test_cost_table_of_the_meta_model_matches_transformer_flops():
    """FLOPs from the passes on the meta/bf16 model = 24 s h^2 + 4 s^2 h per layer plus the LM head (±2 %)."""
    sched = _load("schedules")
    cfg = {"vocab": 512, "seq": 64, "dim": 128, "heads": 4, "layers": 6, "micro_batch": 1}
    costs = sched.model_costs("gpt", cfg)
    s, h, v = cfg["seq"], cfg["dim"], cfg["vocab"]
    analytic = cfg["layers"] * (24 * s * h * h + 4 * s * s * h) + 2 * s * h * v
    assert sum(costs.flops) == pytest.approx(analytic, rel=0.02)
    assert max(costs.crossing_bytes) > 0 and all(n.out_bytes % 2 == 0 for n in costs.nodes)  # bf16 sizes


def test_schedules_smoke_writes_every_family_and_setting(tmp_path):
    data = _run("schedules.py", tmp_path)
    families = data["families"]
    settings = {(r["model"], r["devices"], r["microbatches"]) for r in data["rows"]}
    assert len(data["rows"]) == len(settings) * len(families)
    for model, d, n in settings:
        group = {r["schedule"]: r for r in data["rows"]
                 if (r["model"], r["devices"], r["microbatches"]) == (model, d, n)}
        assert group["1f1b"]["throughput_vs_1f1b"] == 1.0
        if n < 2 * d:
            assert "2*devices" in group["dualpipev"]["skipped"]
        # cross-device messages: one activation and one gradient per micro-batch per device boundary crossed
        expect = {"gpipe": d - 1, "1f1b": d - 1, "chimera": d - 1, "interleaved": 2 * d - 1, "zbv": 2 * d - 2,
                  "dualpipev": 2 * d - 2, "bitpipe-paper": 2 * d - 2, "bitpipe": 2 * d - 2}
        for name, hops in expect.items():
            if "skipped" not in group[name]:
                assert group[name]["p2p_messages"] == 2 * n * hops, (name, d, n)
                assert 0.0 <= group[name]["bubble"] < 1.0
        assert group["zbv"]["local_handoffs"] == group["bitpipe"]["local_handoffs"] == 2 * n
        assert group["1f1b"]["exposed_allreduce_ms"] == 0.0  # one replica per stage: nothing to reduce
        # two model replicas: bitpipe holds about twice 1f1b's weights per device
        assert 1.5 < group["bitpipe"]["weight_gb"] / group["1f1b"]["weight_gb"] < 2.5
    assert {c["best_paper_baseline"] for c in data["comparison"]} <= set(data["paper_baselines"])
    assert len(data["summary"]["bitpipe_vs_paper_baseline"]) == len(settings)


# ---- vs_torch_pipelining.py ----------------------------------------------------------------------


def test_hand_stages_reproduce_the_model():
    """The hand-cut torch stages, run in sequence, compute the example model's logits."""
    vs = _load("vs_torch_pipelining")
    import torch

    from bitpipe_fx.examples.models import gpt

    model, (tokens,) = gpt(layers=4)
    for style, stages in (("loop", 4), ("v", 4), ("loop", 2)):
        owner = vs.stage_ranks(style, 2, stages)
        assert sorted(owner) == sorted([0, 1] * (stages // 2))
        per = 4 // stages
        x = tokens
        for s in range(stages):
            x = vs.HandStage(model, s * per, (s + 1) * per, s == 0, s == stages - 1)(x)
        torch.testing.assert_close(x, model(tokens))
    assert vs.stage_ranks("v", 2, 4) == [0, 1, 1, 0]


@pytest.mark.dist
def test_vs_torch_smoke_gradients_agree(tmp_path):
    data = _run("vs_torch_pipelining.py", tmp_path)
    rows = {(r["library"], r["schedule"].split(" -> ")[0]): r for r in data["rows"]}
    assert set(rows) == {("torch", "1f1b"), ("bitpipe_fx", "1f1b"), ("bitpipe_fx", "bitpipe"), ("bitpipe_fx", "auto")}
    chosen = rows[("bitpipe_fx", "auto")]["chosen"]  # the spec the search picked, shown in the schedule column
    assert rows[("bitpipe_fx", "auto")]["schedule"] == f"auto -> {chosen}" and chosen.split(":")[0] in SCHEDULES
    assert rows[("torch", "1f1b")]["vs_fastest_torch"] == 1.0
    for r in rows.values():
        assert r["agrees"] and r["grad_err"] <= 1e-5, r
        assert r["loss_err"] <= 1e-5
        assert len(r["step_times_s"]) == data["config"]["rounds"] * data["config"]["steps"] and r["step_s"] > 0
        assert len(r["peak_memory_mb"]) == data["procs"] == 2 and min(r["peak_memory_mb"]) > 0
    assert rows[("bitpipe_fx", "1f1b")]["grad_err_vs_torch"] <= 1e-5


# ---- prediction.py -------------------------------------------------------------------------------


def test_replay_recovers_the_costs_of_a_simulated_run():
    """Simulate, read the costs back from the trace, simulate again: the same step for every family."""
    pred = _load("prediction")
    from bitpipe_fx.schedules import generate
    from bitpipe_fx.sim import CostModel, simulate

    comm = {"p2p_latency": 0.1, "p2p_bandwidth": 1e3, "allreduce_latency": 0.2, "allreduce_bandwidth": 1e3}
    for name in ("1f1b", "interleaved", "zbv", "bitpipe"):
        program = generate(name, 4, 8)
        s = program.stages
        cost = CostModel(forward=tuple(1.0 + 0.1 * k for k in range(s)),
                         backward=tuple(2.0 + 0.3 * k for k in range(s)),
                         weight_fraction=0.4, activation_bytes=50.0, param_bytes=100.0, **comm)
        first = simulate(program, cost)
        replayed = pred.replay_costs(list(first.events), program, comm, cost)
        assert replayed.forward == pytest.approx(cost.forward)
        assert replayed.backward == pytest.approx(cost.backward)
        assert simulate(program, replayed).makespan == pytest.approx(first.makespan), name
        stats = pred.timeline_stats(list(first.events), program.devices)
        assert stats["bubble"] == pytest.approx(first.bubble_ratio)


@pytest.mark.dist
def test_prediction_smoke_reports_measured_and_predicted_bubbles(tmp_path):
    data = _run("prediction.py", tmp_path)
    assert [r["schedule"] for r in data["rows"]] == ["1f1b", "bitpipe"]
    assert data["comm"]["p2p_latency"] > 0 and data["comm"]["allreduce_bandwidth"] > 0
    for r in data["rows"]:
        for key in ("measured_bubble", "predicted_bubble", "replayed_bubble"):
            assert 0.0 <= r[key] < 1.0, (key, r)
        assert r["predicted_bubble_error"] == pytest.approx(r["predicted_bubble"] - r["measured_bubble"])
        assert r["measured_step_s"] <= r["measured_wall_s"] * 1.5
        assert r["measured_imbalance"] >= 1.0
    assert [r["stages"] for r in data["rows"]] == [2, 4]


# ---- runtime_overhead.py -------------------------------------------------------------------------


def test_fused_peer_replaces_each_i_by_b_and_drops_w():
    ro = _load("runtime_overhead")
    from bitpipe_fx.schedules import generate, validate

    program = generate("zbv", 2, 4)
    peer = ro.fused(program)
    validate(peer)
    for row, peer_row in zip(program.device_actions, peer.device_actions):
        assert [a for a in peer_row if a.kind != "B"] == [a for a in row if a.kind not in ("I", "W")]
        assert [(a.chunk, a.microbatch) for a in peer_row if a.kind == "B"] == \
            [(a.chunk, a.microbatch) for a in row if a.kind == "I"]


def test_runtime_overhead_smoke_reports_ratios_and_equal_gradients(tmp_path):
    data = _run("runtime_overhead.py", tmp_path)
    (row,) = data["rows"]
    assert row["grad_max_abs_diff"] <= 1e-5  # the split and the fused step compute the same gradients
    for key in ("b_ms", "i_ms", "w_ms", "iw_over_b", "python_ms_per_action", "split_step_over_fused"):
        assert row[key] > 0, key
    rounds = data["raw"]["rounds"]
    assert len(rounds["fused"]) == len(rounds["split"]) == data["config"]["rounds"]
    assert all(r["I"] == 0 and r["W"] == 0 and r["B"] > 0 for r in rounds["fused"])
    assert all(r["B"] == 0 and r["I"] > 0 and r["W"] > 0 for r in rounds["split"])
    from bitpipe_fx.schedules import generate

    n = data["config"]["microbatches"]
    syncs = sum(a.kind == "SYNC" for row in generate("zbv", 2, n).device_actions for a in row)
    assert rounds["fused"][0]["actions"] == 2 * 4 * n + syncs  # 4 stages x (F + B) per micro-batch
    assert rounds["split"][0]["actions"] == 3 * 4 * n + syncs  # 4 stages x (F + I + W)


# ---- memory.py -----------------------------------------------------------------------------------


def test_memory_meter_counts_a_storage_once_and_frees_it_with_the_graph():
    """Saved tensors through saved_tensors_hooks: a storage saved twice counts once, parameters not at all,
    and the bytes go when the graph is freed."""
    mem = _load("_meter")
    import torch

    w = torch.nn.Parameter(torch.ones(8, 8))
    meter = mem.Meter(1, {w.untyped_storage().data_ptr()})
    x = torch.ones(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        y = (x @ w).sin() * x  # the matmul and the product both save x; sin saves x @ w, the product sin(x @ w)
        assert meter.saved.total[0] == 3 * 4 * 8 * 4  # x, x @ w, sin(x @ w) in float32; w excluded
        y.sum().backward()
    assert meter.saved.total[0] == 0 and meter.saved.peak[0] == 3 * 4 * 8 * 4


def test_memory_smoke_prediction_holds_and_recompute_cuts_1f1b(tmp_path):
    data = _run("memory.py", tmp_path, timeout=300)
    runs = {(r["family"], r["recompute"]): r for r in data["runs"]}
    assert set(runs) == {(f, m) for f in ("1f1b", "zbv", "bitpipe") for m in ("none", "full")}
    for run in runs.values():
        for dev in run["devices"]:
            for kind in ("params", "grads", "optimizer"):  # exact: the same bytes counted two ways
                assert dev["measured"][kind] == dev["predicted"][kind], (run["family"], kind)
            assert abs(dev["predicted_total"] / dev["measured"]["total"] - 1) <= data["goal"], run["family"]
    rows = {(r["family"], r["recompute"]): r for r in data["rows"]}
    assert rows[("1f1b", "full")]["act_vs_none"] <= 0.5
    # two steps (the one that creates the optimizer state, then the measured one) x 4 stages x 8 micro-batches
    assert runs[("1f1b", "full")]["recomputed"] == 2 * 4 * 8 and runs[("1f1b", "none")]["recomputed"] == 0
    assert (tmp_path / "memory.png").stat().st_size > 0
