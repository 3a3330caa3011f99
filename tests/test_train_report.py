"""The end-of-run timeline report: each device's step split into compute, waiting for communication and idle
(one rule for the measured and the predicted timeline), and wording that says what a figure means."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bitpipe_fx.schedules import generate
from bitpipe_fx.sim.cost import CostModel
from bitpipe_fx.sim.engine import simulate
from bitpipe_fx.sim.trace import TraceEvent
from bitpipe_fx.train.report import DeviceTime, Setting, bubble, compare_timelines, split


def _ev(device: int, kind: str, start: float, end: float) -> TraceEvent:
    return TraceEvent(device, f"{kind}{device}@{start}", kind, 0, 0, 0, start, end)


# device 0: F 0-2, waits for a gradient 2-5, B 5-7, then idle to the makespan (8)
# device 1: a receive 0-1 overlapped by F 0.5-3, a send 3-4, nothing 4-6, B 6-7.5, an all-reduce 7-8
SYNTHETIC = [
    _ev(0, "F", 0, 2), _ev(0, "RECV", 2, 5), _ev(0, "B", 5, 7),
    _ev(1, "RECV", 0, 1), _ev(1, "F", 0.5, 3), _ev(1, "SEND", 3, 4), _ev(1, "B", 6, 7.5), _ev(1, "SYNC", 7, 8),
]


def test_split_of_a_synthetic_timeline_by_hand():
    makespan, parts = split(SYNTHETIC, 2)
    assert makespan == 8
    assert parts[0] == DeviceTime(compute=4, communication=3, idle=1)
    # device 1: compute 2.5 + 1.5; communication 0.5 (0-0.5) + 1 (3-4) + 0.5 (7.5-8); idle 4-6
    assert parts[1] == DeviceTime(compute=4, communication=2, idle=2)
    assert bubble(SYNTHETIC, 2) == (8, pytest.approx(((8 - 4) / 8 + (8 - 4) / 8) / 2))


@pytest.mark.parametrize("cost", [CostModel(forward=1, backward=2),
                                  CostModel(forward=1, backward=3, param_bytes=50.0, allreduce_bandwidth=10.0)])
def test_split_of_a_simulated_step_uses_the_simulators_definitions(cost):
    report = simulate(generate("bitpipe", 4, 8), cost)
    makespan, parts = split(report.events, 4)
    assert makespan == pytest.approx(report.makespan)
    for d, part in enumerate(parts):
        assert part.compute == pytest.approx(report.busy(d))
        assert part.communication + part.idle == pytest.approx(report.idle(d))
        assert min(part.communication, part.idle) >= 0


def _timeline():
    program = generate("1f1b", 2, 4)
    cost = CostModel(forward=1.0, backward=2.0)
    plan = SimpleNamespace(program=program, cost_model=lambda: cost)
    measured = [*SYNTHETIC, _ev(2, "F", 0, 50)]  # rank 2 is a further data-parallel pipeline: not reported
    return compare_timelines(plan, [TraceEvent(e.device, e.name, e.kind, 0, 0, 0, e.start * 1e-3, e.end * 1e-3)
                                    for e in measured], step=3)


def test_report_prints_each_devices_split_with_the_prediction():
    timeline = _timeline()
    expected = [(4e-3, 3e-3, 1e-3), (4e-3, 2e-3, 2e-3)]
    assert [tuple(pytest.approx(v) for v in (t.compute, t.communication, t.idle)) for t in timeline.measured_split] \
        == expected
    text = timeline.describe(Setting(processes=2, cores=2))
    lines = text.splitlines()
    assert lines[0].startswith("timeline of step 3: measured 8.0 ms, bubble 50.0%; simulator's prediction")
    assert lines[1].startswith("  device 0: compute 4.0 ms, waiting for communication 3.0 ms, idle 1.0 ms; predicted")
    assert lines[2].startswith("  device 1: compute 4.0 ms, waiting for communication 2.0 ms, idle 2.0 ms; predicted")
    assert len(lines) == 3


def test_local_run_says_what_the_figure_means_and_prints_no_measured_bubble():
    text = _timeline().describe(Setting(local=True))
    assert text.startswith("timeline of step 3: measured 8.0 ms in one process (--local) running the 2 devices one "
                           "after another, so a device's idle time is the others' work, not a pipeline bubble; ")
    assert "bubble 50.0%" not in text and text.count("bubble ") == 1  # the prediction's only


def test_processes_outnumbering_cores_say_so_instead_of_a_bubble():
    setting = Setting(processes=4, cores=2)
    assert setting.shared and not Setting(processes=4, cores=2, cpu=False).shared
    assert not Setting(local=True, processes=4, cores=2).shared
    text = _timeline().describe(setting)
    assert "measured 8.0 ms with 4 processes sharing 2 CPU cores, so a rank also waits for a core" in text
    assert "bubble 50.0%" not in text
