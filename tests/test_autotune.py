"""Programs generated from the plan's cost model, and the ``schedule="auto"`` search.

Checked: a costed generator is never slower in the simulator than its unit-cost order under the same costs;
plans from real costs meet the numerics contract in every family (float64, 1e-12) and regenerate the same
program from their JSON; auto is deterministic, respects its memory limit, refuses when nothing fits, and
its plan trains within the contract.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

import bitpipe_fx as bp
from bitpipe_fx.autotune import autotune, peak_memory
from bitpipe_fx.compiler import build_plan
from bitpipe_fx.errors import ConfigError, ScheduleError
from bitpipe_fx.passes import capture, estimate_costs
from bitpipe_fx.plan import Plan
from bitpipe_fx.planning import costed_program
from bitpipe_fx.schedules import SCHEDULES, generate, validate
from bitpipe_fx.schedules.registry import takes_costs
from bitpipe_fx.schedules.spec import make_spec, parse_bytes, parse_spec
from bitpipe_fx.sim import CostModel, simulate
from tests.support.cases import contract_errors, model_case

SLOW_LINKS = {"p2p_latency": 2e-6, "p2p_bandwidth": 2e9, "allreduce_latency": 1e-5, "allreduce_bandwidth": 1e9}
UNEVEN = CostModel(forward=(1.0, 3.0, 1.0, 1.0, 2.0, 1.0, 1.0, 4.0), backward=(2.0, 5.0, 2.0, 2.0, 4.0, 2.0, 3.0, 8.0),
                   activation_bytes=1e3, p2p_bandwidth=1e3, p2p_latency=0.2, param_bytes=1e3,
                   allreduce_bandwidth=500.0)
_CASE: dict[str, object] = {}


def gpt_case():
    if "gpt" not in _CASE:
        _CASE["gpt"] = model_case("gpt")
    return _CASE["gpt"]


def gpt_costs():
    if "costs" not in _CASE:
        case = gpt_case()
        _CASE["costs"] = estimate_costs(capture(case.model, case.example_inputs))
    return _CASE["costs"]


@pytest.mark.parametrize("name", ["zbv", "bitpipe"])
def test_costed_generation_is_never_slower_and_uses_the_costs(name):
    unit = simulate(generate(name, 4, 8), UNEVEN).makespan
    costed = generate(name, 4, 8, costs=UNEVEN)
    assert costed != generate(name, 4, 8)
    assert simulate(costed, UNEVEN).makespan < unit


def test_chimera_takes_per_stage_costs():
    cm = dataclasses.replace(UNEVEN, forward=UNEVEN.forward[:4], backward=UNEVEN.backward[:4], param_bytes=0.0)
    costed = simulate(generate("chimera", 4, 8, costs=cm), cm).makespan
    assert costed <= simulate(generate("chimera", 4, 8), cm).makespan


def test_zbv_defer_w_is_checked():
    with pytest.raises(ScheduleError, match="zbv defer_w must be a non-negative integer"):
        generate("zbv", 4, 8, defer_w=-1)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_numerics_contract_with_programs_from_real_costs(schedule):
    case = gpt_case()
    devices = 2
    plan, split_model = build_plan(case.model, case.example_inputs, schedule, devices, 4, network=SLOW_LINKS)
    assert plan.costed == takes_costs(schedule)
    assert len(set(plan.forward)) > 1, "the stages have unequal costs"
    result = contract_errors(dataclasses.replace(case, split_for=lambda _: split_model), plan.program)
    assert result["fqns"] == result["all_fqns"]
    for key in ("loss_err", "grad_err", "param_err"):
        assert result[key] <= 1e-12, (key, result)


@pytest.mark.parametrize("schedule", ["bitpipe", "zbv", "chimera"])
def test_plan_json_regenerates_the_identical_program(schedule):
    case = gpt_case()
    plan, _ = build_plan(case.model, case.example_inputs, schedule, 4, 8, network=SLOW_LINKS)
    loaded = Plan.from_json(plan.to_json())
    assert loaded == plan
    assert loaded.costed and loaded.network == SLOW_LINKS
    assert costed_program(loaded) == plan.program


def test_network_fields_are_checked():
    case = gpt_case()
    with pytest.raises(ConfigError, match="network has no field 'bandwidth'"):
        build_plan(case.model, case.example_inputs, "gpipe", 2, 4, network={"bandwidth": 1.0})


def test_parse_bytes():
    assert parse_bytes("12GiB") == 12 * 2**30
    assert parse_bytes("1.5e3") == 1500.0
    assert parse_bytes("800MB") == 8e8
    assert parse_bytes(4096) == 4096.0
    with pytest.raises(ConfigError, match=r"memory_limit must be a positive size.*'12 parsecs'"):
        parse_bytes("12 parsecs")


def test_auto_spec():
    assert parse_spec("auto:memory_limit=1GiB").kwargs() == {"memory_limit": "1GiB"}
    with pytest.raises(ScheduleError, match="schedule 'auto' has no option 'chunks'"):
        parse_spec("auto:chunks=2")


def test_auto_is_deterministic_and_reproduces_through_json():
    case = gpt_case()
    first, _ = build_plan(case.model, case.example_inputs, "auto", 4, 8, network=SLOW_LINKS)
    second, _ = build_plan(case.model, case.example_inputs, "auto", 4, 8, network=SLOW_LINKS)
    assert first.to_json() == second.to_json()
    ranked = first.search.candidates
    assert ranked[0].spec == str(make_spec(first.schedule, first.schedule_options))
    fitted = [c for c in ranked if c.status == "ok"]
    assert fitted[0].makespan == min(c.makespan for c in fitted)
    assert fitted[0].makespan == simulate(first.program, first.cost_model()).makespan
    loaded = Plan.from_json(first.to_json())
    assert loaded == first and costed_program(loaded) == first.program
    assert "auto: " in first.summary() and "wins with the shortest predicted step" in first.summary()


def test_auto_memory_limit_changes_the_choice_or_refuses():
    costs = gpt_costs()
    fields = {"graph_hash": "h", "network": SLOW_LINKS}
    free = autotune(costs, 4, 8, fields)
    ok = [c for c in free.search.candidates if c.status == "ok"]
    win = ok[0]
    report = simulate(free.program, free.cost_model())
    assert max(peak_memory(free)) == win.peak
    assert win.peak >= 4 * max(report.weight_byte_counts)  # parameter, gradient, two optimizer-state copies
    smaller = min(c.peak for c in ok)
    assert smaller < win.peak, "a leaner candidate exists"
    limit = (smaller + win.peak) / 2
    tight = autotune(costs, 4, 8, fields, memory_limit=limit)
    assert tight.search.winner.spec != win.spec
    assert tight.search.winner.peak <= limit
    assert all(c.peak > limit for c in tight.search.candidates if c.status == "over memory")
    expected = "no schedule fits memory_limit=.* the smallest predicted peak is " + re.escape(f"{smaller:.6g}")
    with pytest.raises(ConfigError, match=expected):
        autotune(costs, 4, 8, fields, memory_limit=smaller / 2)


def test_auto_plan_trains_within_the_contract():
    case = gpt_case()
    plan, split_model = build_plan(case.model, case.example_inputs, "auto", 2, 4, network=SLOW_LINKS)
    assert plan.search is not None
    result = contract_errors(dataclasses.replace(case, split_for=lambda _: split_model), plan.program)
    for key in ("loss_err", "grad_err", "param_err"):
        assert result[key] <= 1e-12, (key, result)


@pytest.mark.parametrize(("devices", "microbatches"), [(2, 4), (4, 8), (4, 5)])
def test_zbv_every_lag_is_valid_and_keeps_the_f_i_order(devices, microbatches):
    paper = generate("zbv", devices, microbatches, defer_w=0)
    for lag in range(2 * devices + 1):
        program = generate("zbv", devices, microbatches, defer_w=lag)
        validate(program)
        for d in range(devices):
            def f_i(p, d=d):
                return [a for a in p.actions(d) if a.kind in "FI"]
            assert f_i(program) == f_i(paper)
            assert sorted(map(str, program.actions(d))) == sorted(map(str, paper.actions(d)))


def test_compile_accepts_schedule_auto_with_the_plan_it_chose():


    case = gpt_case()
    plan, _ = build_plan(case.model, case.example_inputs, "auto", 2, 4, memory_limit="1GiB")
    pipe = bp.compile(case.model, case.example_inputs, case.loss_fn, schedule="auto", memory_limit="1GiB", plan=plan)
    assert pipe.program == plan.program
    with pytest.raises(ConfigError, match="conflicts with the plan's schedule"):
        bp.compile(case.model, case.example_inputs, case.loss_fn, schedule="auto", memory_limit="2GiB", plan=plan)


def test_compile_auto_ranks_with_the_cost_options_inspect_uses(tmp_path):
    case = gpt_case()
    inspected, _ = build_plan(case.model, case.example_inputs, "auto", 2, 4, flop_rate=5e9, network=SLOW_LINKS)
    pipe = bp.compile(case.model, case.example_inputs, case.loss_fn, schedule="auto", devices=2, microbatches=4,
                      flop_rate=5e9, network=SLOW_LINKS)
    assert pipe.plan.search == inspected.search and pipe.program == inspected.program
    assert pipe.plan.flop_rate == 5e9 and pipe.plan.network == SLOW_LINKS
    assert "\n".join(inspected.search.table()) in pipe.plan.summary()
    pipe.plan.save(tmp_path / "plan.json")
    again = bp.compile(case.model, case.example_inputs, case.loss_fn, plan=tmp_path / "plan.json")
    assert again.program == inspected.program and again.plan.search == inspected.search
    with pytest.raises(ConfigError, match=r"flop_rate=1e\+12 conflicts with the plan's flop_rate=5e\+09"):
        bp.compile(case.model, case.example_inputs, case.loss_fn, plan=tmp_path / "plan.json", flop_rate=1e12)
    with pytest.raises(ConfigError, match="profile=True measures stage times to make a plan, but a plan was given"):
        bp.compile(case.model, case.example_inputs, case.loss_fn, plan=tmp_path / "plan.json", profile=True)
