"""Chrome-trace export and import of timelines: structure, round trip, units."""

from __future__ import annotations

import json

import pytest

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.schedules import generate
from bitpipe_fx.sim import CostModel, TraceEvent, chrome_trace, read_chrome_trace, simulate, write_chrome_trace


@pytest.fixture(scope="module")
def report():
    cost = CostModel(forward=1, backward=2, p2p_latency=0.25, allreduce_latency=1.0, data_parallel=2)
    return simulate(generate("1f1b", 4, 6), cost)


def test_round_trip_of_simulated_events(report, tmp_path):
    path = write_chrome_trace(tmp_path / "t.json", report.events, metadata={"schedule": "1f1b"})
    assert read_chrome_trace(path) == list(report.events)
    assert json.loads(path.read_text())["otherData"] == {"schedule": "1f1b", "unit_us": 1.0}


def test_one_process_per_device_and_thread_rows(report):
    trace = chrome_trace(report.events)
    meta = [e for e in trace["traceEvents"] if e["ph"] == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert procs == {d: f"device {d}" for d in range(4)}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert threads[(0, 0)] == "compute" and threads[(0, 1)] == "p2p" and threads[(0, 2)] == "all-reduce"
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(report.events)
    f = next(e for e in xs if e["name"] == "F0.2.3")
    assert f["pid"] == 2 and f["tid"] == 0
    assert f["args"] == {"kind": "F", "pipe": 0, "stage": 2, "microbatch": 3}
    sync = next(e for e in xs if e["args"]["kind"] == "SYNC")
    assert sync["tid"] == 2 and sync["dur"] == 1.0


def test_measured_seconds_scale_and_unknown_kinds(tmp_path):
    events = [
        TraceEvent(0, "F0.0.0", "F", 0, 0, 0, 0.0015, 0.0025),
        TraceEvent(1, "optimizer", "OPT", -1, -1, -1, 0.003, 0.0041),
        TraceEvent(1, "wait", "WAIT", -1, -1, -1, 0.001, 0.002),
    ]
    trace = chrome_trace(events, unit_us=1e6)
    x = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert x[0]["ts"] == pytest.approx(1500.0) and x[0]["dur"] == pytest.approx(1000.0)
    assert x[1]["tid"] != x[2]["tid"] and min(x[1]["tid"], x[2]["tid"]) > 2  # own rows after the standard three
    path = write_chrome_trace(tmp_path / "m.json", events, unit_us=1e6)
    back = read_chrome_trace(path)
    assert [(e.device, e.name, e.kind, e.pipe, e.stage, e.microbatch) for e in back] == [
        (e.device, e.name, e.kind, e.pipe, e.stage, e.microbatch) for e in events
    ]
    for got, want in zip(back, events):
        assert got.start == pytest.approx(want.start, rel=1e-12) and got.end == pytest.approx(want.end, rel=1e-12)


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="unit_us must be > 0"):
        chrome_trace([], unit_us=0)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="no 'traceEvents' key"):
        read_chrome_trace(bad)
    bad.write_text("not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        read_chrome_trace(bad)
