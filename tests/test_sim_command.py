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
