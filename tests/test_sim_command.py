"""`bitpipe-fx simulate`: the comparison table over every registered schedule, and its outputs."""

from __future__ import annotations

import json

import pytest

from bitpipe_fx.cli import main
from bitpipe_fx.errors import ConfigError, ScheduleError
from bitpipe_fx.schedules import SCHEDULES, Action, Program, generate
from bitpipe_fx.schedules.ir import v_placement
from bitpipe_fx.schedules.spec import make_spec
from bitpipe_fx.sim import CostModel, simulate
from bitpipe_fx.sim.command import cost_model, parse_costs, run_one


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def v_hand(devices: int, microbatches: int) -> Program:
    """A one-micro-batch V over two devices (S = 2D = 4 stages)."""
    rows = ["F0.0.0 F0.3.0 B0.3.0 SYNC0.3 B0.0.0 SYNC0.0", "F0.1.0 F0.2.0 B0.2.0 SYNC0.2 B0.1.0 SYNC0.1"]
    return Program("v-hand", v_placement(2), (0,), tuple(tuple(Action.parse(t) for t in r.split()) for r in rows))


def refuses(devices: int, microbatches: int) -> Program:
    raise ScheduleError(f"refuses needs D > 64, got D={devices}")


def test_table_lists_every_schedule(capsys, monkeypatch):
    monkeypatch.setitem(SCHEDULES, "refuses", refuses)
    assert main(["simulate", "--devices", "4", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert "- refuses: rejected: refuses needs D > 64, got D=4" in out
    for name in SCHEDULES:
        assert name in rows or f"- {name}: rejected: " in out
    # 1f1b with F=1, B=2 and free communication: (N + D - 1)(F + B) = 33
    header = rows["schedule"]
    assert rows["1f1b"][header.index("makespan")] == "33"
    assert rows["1f1b"][header.index("thpt vs 1f1b")] == "1.00x"
    assert rows["gpipe"][header.index("peak act (x1/D)")] == "8"


def test_costs_are_per_device_share(monkeypatch):
    # S = 2D: each stage runs at D/S = 1/2 of F=1, B=2; the lone micro-batch is one serial chain: 4·0.5 + 4·1
    monkeypatch.setitem(SCHEDULES, "v-hand", v_hand)
    outcome = run_one(make_spec("v-hand"), 2, 1, cost_model({"F": 1, "B": 2}))
    assert outcome.reason == ""
    assert outcome.report.makespan == 6
    assert simulate(v_hand(2, 1), CostModel(forward=1, backward=2)).makespan == 12


def test_outputs(tmp_path, capsys):
    args = ["simulate", "-d", "4", "-n", "6", "--schedules", "gpipe,1f1b", "--costs", "F=1,B=3,W=1",
            "--png", str(tmp_path / "g.png"), "--trace", str(tmp_path / "t.json"), "--json", str(tmp_path / "s.json")]
    assert main(args) == 0
    assert "F=1 B=3 (I=2 W=1)" in capsys.readouterr().out
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "s.json").read_text())
    want = simulate(generate("gpipe", 4, 6), CostModel(forward=1, backward=3, weight_fraction=1 / 3))
    assert data["rows"][0] == {**want.summary_row(), "schedule": "gpipe"}
    for name in ("gpipe", "1f1b"):
        trace = json.loads((tmp_path / f"t.{name}.json").read_text())
        assert trace["otherData"]["schedule"] == name


def test_bad_arguments(capsys):
    assert main(["simulate", "--costs", "F=1,X=2"]) == 2
    assert "cannot read cost 'X=2'; write F=<forward>,B=<backward>" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"W=3\.0 must lie between 0 and B=2\.0"):
        cost_model(parse_costs("B=2,W=3"))
    with pytest.raises(ConfigError, match="cost F='one' is not a number"):
        parse_costs("F=one")


def test_bad_schedule_spec_is_an_error_not_a_rejected_row(capsys):
    assert main(["simulate", "-d", "4", "-n", "8", "--schedules", "gpipe,1f1b:colour=2"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing simulated
    assert err == "bitpipe-fx simulate: error: schedule '1f1b' has no option 'colour'; it takes no options\n"


def test_spec_list_with_several_options(capsys):
    assert main(["simulate", "-d", "2", "-n", "4", "--schedules", "bitpipe:inflight=1,weight_fraction=0.25,1f1b"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert {"bitpipe:inflight=1,weight_fraction=0.25", "1f1b"} <= set(rows)


AUTO_ARGS = ["simulate", "-d", "4", "-n", "8", "--param-bytes", "100", "--activation-bytes", "10", "--costs",
             "F=1,B=3,W=1.2"]


def _candidates_by_hand() -> dict[str, tuple[float, float]]:
    """(makespan, peak bytes) of every searched spec, each simulated on its own; peak = 4 copies of the
    device's weights (parameter, gradient, two optimizer states) + its most activation bytes alive."""
    from bitpipe_fx.ranking import candidate_specs

    cost = cost_model(parse_costs("F=1,B=3,W=1.2"), activation_bytes=10.0, param_bytes=100.0)
    out = {}
    for spec in candidate_specs(4, 8):
        r = run_one(spec, 4, 8, cost).report
        if r is not None:
            out[str(spec)] = (r.makespan, max(4 * r.weight_bytes(d) + r.peak_activation_bytes(d)
                                              for d in range(r.devices)))
    return out


def test_simulate_auto_picks_the_fastest_candidate_and_shows_the_ranking(capsys, tmp_path):
    by_hand = _candidates_by_hand()
    assert main([*AUTO_ARGS, "--schedule", "auto", "--json", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    best = min(by_hand, key=lambda k: by_hand[k])  # the fastest; a tie goes to the smaller peak, then search order
    row = table_rows(out)[f"auto -> {best}"]
    assert float(row[2]) == pytest.approx(by_hand[best][0])
    assert f"auto: {len(by_hand)} candidates, no memory limit; {best} wins" in out
    saved = json.loads((tmp_path / "a.json").read_text())["auto"]
    assert [c["spec"] for c in saved["candidates"]] == sorted(by_hand, key=lambda k: by_hand[k])


def test_simulate_auto_respects_the_memory_limit_or_names_the_smallest_peak(capsys):
    by_hand = _candidates_by_hand()
    fastest = min(by_hand, key=lambda k: by_hand[k])
    limit = (min(p for _, p in by_hand.values()) + by_hand[fastest][1]) / 2
    fits = {k: v for k, v in by_hand.items() if v[1] <= limit}
    assert fits and fastest not in fits
    assert main([*AUTO_ARGS, "--schedule", "auto", "--memory-limit", str(limit)]) == 0
    out = capsys.readouterr().out
    winner = min(fits, key=lambda k: fits[k])
    assert f"auto -> {winner}" in table_rows(out)
    assert main([*AUTO_ARGS, "--schedule", f"auto:memory_limit={limit}"]) == 0
    assert f"auto:memory_limit={limit} -> {winner}" in table_rows(capsys.readouterr().out)
    smallest = min(p for _, p in by_hand.values())
    assert main([*AUTO_ARGS, "--schedule", "auto", "--memory-limit", str(smallest / 2)]) == 2
    err = capsys.readouterr().err
    assert (f"no schedule fits memory_limit={smallest / 2:.6g} bytes: the smallest predicted peak is "
            f"{smallest:.6g}") in err


def test_simulate_memory_limit_needs_auto(capsys):
    assert main([*AUTO_ARGS, "--schedule", "gpipe", "--memory-limit", "1GiB"]) == 2
    assert "give --memory-limit only with it" in capsys.readouterr().err
