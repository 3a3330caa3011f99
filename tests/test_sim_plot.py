"""Gantt charts: the files are real PNGs of a size that fits the number of devices and panels."""

from __future__ import annotations

import struct

import pytest

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.schedules import generate
from bitpipe_fx.schedules.ir import Action, Program, chimera_placement
from bitpipe_fx.sim import CostModel, simulate

pytest.importorskip("matplotlib")
from bitpipe_fx.sim.plot import gantt, gantt_compare


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def chimera_split() -> Program:
    """Two pipes with split backward and all-reduce: every kind the chart colours."""
    rows = ["F0.0.0 F1.1.1 I1.1.1 W1.1.1 SYNC1.1 I0.0.0 W0.0.0 SYNC0.0",
            "F1.0.1 F0.1.0 I0.1.0 W0.1.0 SYNC0.1 I1.0.1 W1.0.1 SYNC1.0"]
    acts = tuple(tuple(Action.parse(t) for t in r.split()) for r in rows)
    return Program("chimera-split", chimera_placement(2), (0, 1), acts)


def test_gantt_writes_png(tmp_path):
    report = simulate(generate("1f1b", 4, 8))
    w, h = png_size(gantt(report, tmp_path / "g.png"))
    assert 1000 <= w <= 2500 and 150 <= h <= 800
    cost = CostModel(param_bytes=4.0, allreduce_latency=0.5, allreduce_bandwidth=1.0)
    w2, h2 = png_size(gantt(simulate(chimera_split(), cost).events, tmp_path / "c.png", title="two pipes"))
    assert w2 == w and h2 < h  # same width, fewer device rows


def test_gantt_compare_stacks_two_timelines(tmp_path):
    a = simulate(generate("1f1b", 4, 8))
    b = simulate(generate("gpipe", 4, 8))
    w, h = png_size(gantt(a, tmp_path / "one.png"))
    w2, h2 = png_size(gantt_compare(a, b.events, tmp_path / "two.png", ("predicted", "measured")))
    assert w2 == w and h2 > 1.6 * h


def test_gantt_compare_needs_two_labels(tmp_path):
    a = simulate(generate("1f1b", 2, 2))
    with pytest.raises(ConfigError, match="two labels"):
        gantt_compare(a, a, tmp_path / "x.png", ("only one",))
