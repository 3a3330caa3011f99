"""DeviceOrder: the step notation the V-shaped generators are written in (zbv, dualpipev)."""

from __future__ import annotations

import pytest

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules import Action
from bitpipe_fx.schedules.build import DeviceOrder


def test_ops_take_each_chunks_next_microbatch_and_skip_past_the_last():
    dev = DeviceOrder((1, 6), microbatches=2)
    dev.run(3, "F0")
    dev.run(1, "F1 B1 I1 B1")
    assert [str(a) for a in dev.actions] == ["F0.1.0", "F0.1.1", "F0.6.0", "B0.6.0", "I0.6.1"]
    assert (dev.count("F", 0), dev.count("B", 1), dev.deferred(1)) == (2, 2, 1)


def test_w_runs_the_oldest_deferred_w_overall_or_of_one_chunk():
    dev = DeviceOrder((0, 3), microbatches=4)
    dev.run(1, "F0 F1 F0 F1 I1 I0 I1")
    dev.run(1, "W0 W W W")  # one W0, then the two W1's oldest first; the last W finds nothing queued
    ws = [a for a in dev.actions if a.kind == "W"]
    assert ws == [Action("W", 0, 0, 0), Action("W", 0, 3, 0), Action("W", 0, 3, 1)]


def test_unknown_op_is_refused_with_the_notation():
    with pytest.raises(ScheduleError, match=r"unknown op X1; write F0, B1, I0, W1 or W"):
        DeviceOrder((0,), 1).run(1, "X1")
    with pytest.raises(ScheduleError, match=r"unknown op F; write"):
        DeviceOrder((0,), 1).run(1, "F")
