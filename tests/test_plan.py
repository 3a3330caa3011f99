"""Plan: what build_plan decides, exact JSON round-trip, summary numbers, the simulator's cost model,
re-cutting a model from a saved plan, and profiling."""

from __future__ import annotations

import pytest
import torch

from bitpipe_fx.compiler import build_plan, split_from_plan
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples.models import gpt
from bitpipe_fx.passes import run_stages
from bitpipe_fx.plan import Plan
from bitpipe_fx.schedules import generate
from bitpipe_fx.sim import CostModel, simulate


@pytest.fixture(scope="module")
def bitpipe_plan():
    model, example = gpt(layers=8)
    plan, sm = build_plan(model, example, "bitpipe", devices=4, microbatches=8)
    return model, example, plan, sm


def test_plan_holds_the_schedules_program_and_one_row_per_stage(bitpipe_plan):
    model, _example, plan, sm = bitpipe_plan
    # generated with the plan's own costs: bitpipe's placement and pipe map, its order from those costs
    assert plan.costed and plan.program == generate("bitpipe", 4, 8, costs=plan.cost_model())
    assert plan.program.placement == generate("bitpipe", 4, 8).placement
    assert plan.num_stages == 8 == sm.num_stages == len(plan.cuts) + 1
    assert plan.model == "GPT"
    # the rows describe the stages that were built
    for row, spec in zip(plan.stages, sm.specs):
        assert row.index == spec.index
        assert row.param_bytes == sum(model.get_parameter(p).numel() * 4 for p in spec.params)
    assert plan.stages[-1].bytes_sent == 0 and all(r.bytes_sent > 0 for r in plan.stages[:-1])
    assert sum(r.nodes for r in plan.stages) == plan.cuts[-1] + plan.stages[-1].nodes


def test_json_round_trip_is_exact(bitpipe_plan, tmp_path):
    _, _, plan, _ = bitpipe_plan
    again = Plan.from_json(plan.to_json())
    assert again == plan
    path = tmp_path / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    with pytest.raises(ConfigError, match="no plan file at"):
        Plan.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="plan is not valid JSON"):
        Plan.from_json("{nope")
    with pytest.raises(ConfigError, match="not a bitpipe_fx plan"):
        Plan.from_json('{"schedule": "bitpipe"}')


def test_device_loads_and_balance_follow_from_the_stage_rows(bitpipe_plan):
    _, _, plan, _ = bitpipe_plan
    # independent recomputation: bitpipe device d holds down {d, 2D-1-d} and up {D-1-d, D+d}, N/2 each
    d_, n = 4, 8
    stage_time = [3 * r.flops / plan.flop_rate for r in plan.stages]  # forward + backward (2x)
    expected = []
    for d in range(d_):
        chunks = (d, 2 * d_ - 1 - d, d_ - 1 - d, d_ + d)
        expected.append(sum(stage_time[s] * n / 2 for s in chunks))
    assert plan.device_loads() == pytest.approx(expected, rel=1e-12)
    assert plan.balance == pytest.approx(max(expected) / (sum(expected) / d_), rel=1e-12)
    assert plan.balance <= 1.10


def test_summary_lists_every_stage_and_device(bitpipe_plan):
    _, _, plan, _ = bitpipe_plan
    text = plan.summary()
    assert str(plan) == text
    lines = text.splitlines()
    stage_header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("stage"))
    stage_rows = lines[stage_header + 1 : stage_header + 9]
    assert [int(r.split()[0]) for r in stage_rows] == list(range(8))
    assert stage_rows[0].split()[9] == "0,3"  # stage 0: down copy on device 0, up copy on device 3
    device_header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("device"))
    assert [int(r.split()[0]) for r in lines[device_header + 1 : device_header + 5]] == [0, 1, 2, 3]
    assert f"max/mean device load = {plan.balance:.4f}" in text
    assert "simulated step" in text


def test_cost_model_feeds_the_simulator(bitpipe_plan):
    _, _, plan, _ = bitpipe_plan
    cost = plan.cost_model(p2p_bandwidth=1e9)
    assert isinstance(cost, CostModel)
    assert cost.forward == tuple(r.flops / 1e12 for r in plan.stages)
    assert cost.backward == tuple(2 * f for f in cost.forward)
    assert cost.activation_bytes == tuple(float(r.bytes_sent) for r in plan.stages)
    assert cost.param_bytes == tuple(float(r.param_bytes) for r in plan.stages)
    assert cost.p2p_bandwidth == 1e9
    report = simulate(plan.program, cost)
    busy = max(report.busy(d) for d in range(4))
    assert busy == pytest.approx(max(plan.device_loads()), rel=1e-9)


def test_split_from_plan_recuts_the_same_way_and_refuses_another_graph(bitpipe_plan):
    model, example, plan, sm = bitpipe_plan
    again = split_from_plan(model, example, Plan.from_json(plan.to_json()))
    assert again.specs == sm.specs
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(run_stages(again, (tokens,)), model(tokens))
    other, other_example = gpt(layers=6)
    with pytest.raises(ConfigError, match="plan was made for a different graph"):
        split_from_plan(other, other_example, plan)
    bigger = (torch.zeros(4, 16, dtype=torch.long),)  # another micro-batch shape is another graph too
    with pytest.raises(ConfigError, match="plan was made for a different graph"):
        split_from_plan(model, bigger, plan)


def test_schedule_options_and_flop_rate():
    model, example = gpt(layers=4)
    plan, _sm = build_plan(model, example, "interleaved", devices=2, microbatches=4, chunks=2, flop_rate=1e9)
    assert plan.num_stages == 4 and plan.schedule_options == {"chunks": 2}
    assert plan.forward == tuple(r.flops / 1e9 for r in plan.stages)
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(ConfigError, match="flop_rate must be > 0"):
        build_plan(model, example, "1f1b", devices=2, flop_rate=0)


def test_profiled_plan_stores_measured_times():
    model, example = gpt(layers=2, dim=16)
    plan, _sm = build_plan(model, example, "1f1b", devices=2, microbatches=2, profile=True)
    assert len(plan.forward_times) == 2 and len(plan.backward_times) == 2
    assert all(t > 0 for t in plan.forward_times + plan.backward_times)
    assert plan.forward == plan.forward_times and plan.cost_model().backward == plan.backward_times
    assert all(p.grad is None for p in model.parameters())  # profiling leaves the model's gradients alone
    assert Plan.from_json(plan.to_json()) == plan
    assert "profiled times" in plan.summary()
