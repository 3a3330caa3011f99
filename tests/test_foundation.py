"""The package skeleton: error hierarchy, lazy import, IR text/JSON/CSV round-trips, placements."""

from __future__ import annotations

import subprocess
import sys

import pytest

import bitpipe_fx
from bitpipe_fx import errors
from bitpipe_fx.schedules import (
    Action,
    Program,
    consumed_message,
    consumed_value,
    lower,
    messages,
    produced_message,
    produced_value,
)
from bitpipe_fx.schedules.ir import bitpipe_placement, chimera_placement, linear_placement, v_placement


def test_error_hierarchy():
    for cls in (errors.ConfigError, errors.TraceError, errors.PartitionError, errors.ScheduleError,
                errors.PipelineRuntimeError):
        assert issubclass(cls, errors.BitPipeError)
    assert issubclass(errors.ConfigError, ValueError)


def test_import_does_not_load_torch():
    code = "import bitpipe_fx, bitpipe_fx.schedules, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bitpipe_fx.nope  # noqa: B018


@pytest.mark.parametrize("text", ["F0.3.5", "B1.0.0", "I0.7.12", "W1.2.3", "SYNC1.4"])
def test_action_text_round_trip(text):
    assert str(Action.parse(text)) == text


@pytest.mark.parametrize("bad", ["X0.1.2", "F0.1", "SYNC0.1.2", "F-1.0.0", ""])
def test_action_parse_errors(bad):
    with pytest.raises(errors.ScheduleError):
        Action.parse(bad)


def test_placements():
    assert linear_placement(4).table == ((0, 1, 2, 3),)
    assert linear_placement(2, 2).table == ((0, 1, 0, 1),)
    assert v_placement(3).table == ((0, 1, 2, 2, 1, 0),)
    assert chimera_placement(4).table == ((0, 1, 2, 3), (3, 2, 1, 0))
    bp = bitpipe_placement(4)
    # DESIGN.md: device d holds down {d, 2D-1-d} and up {D-1-d, D+d}
    for d in range(4):
        assert set(bp.chunks(d)) == {(0, d), (0, 7 - d), (1, 3 - d), (1, 4 + d)}
    for s in range(8):
        devs = bp.replica_devices(s)
        assert len(devs) == 2 and devs[0] + devs[1] == 3


def _tiny_program() -> Program:
    place = v_placement(2)  # stages 0,1,2,3 on devices 0,1,1,0
    d0 = [Action("F", 0, 0, 0), Action("F", 0, 3, 0), Action("B", 0, 3, 0), Action("B", 0, 0, 0),
          Action("SYNC", 0, 3), Action("SYNC", 0, 0)]
    d1 = [Action("F", 0, 1, 0), Action("F", 0, 2, 0), Action("B", 0, 2, 0), Action("B", 0, 1, 0),
          Action("SYNC", 0, 2), Action("SYNC", 0, 1)]
    return Program("tiny", place, (0,), (tuple(d0), tuple(d1)))


def test_program_serialisation_round_trips():
    p = _tiny_program()
    assert Program.from_json(p.to_json()) == p
    assert Program.from_csv(p.to_csv()) == p
    assert p.to_text().splitlines()[0] == "dev0: F0.0.0 F0.3.0 B0.3.0 B0.0.0 SYNC0.3 SYNC0.0"


def test_v_turn_is_local_and_messages_cross_devices():
    p = _tiny_program()
    msgs = messages(p)
    # F0 -> dev1, F2 -> dev0 (stage 2 on dev1 to stage 3 on dev0), B3 grad -> dev1, B1 grad -> dev0
    assert [str(m) for m in msgs] == ["act0.0.0:0->1", "grad0.3.0:0->1", "act0.2.0:1->0", "grad0.1.0:1->0"]
    lowered = lower(p)
    # the V turn (stage 1 -> 2 on device 1) has no message
    assert all("act0.1" not in str(op) for op in lowered[1])


def test_values_cover_local_hand_offs_and_messages_only_cross_devices():
    p = _tiny_program()
    f1, f2 = Action("F", 0, 1, 0), Action("F", 0, 2, 0)
    turn = produced_value(p, f1)
    assert (turn.src, turn.dst) == (1, 1) and consumed_value(p, f2) == turn
    assert produced_message(p, f1) is None and consumed_message(p, f2) is None
    assert produced_value(p, Action("F", 0, 3, 0)) is None  # the last stage feeds the loss, not a chunk
    assert consumed_value(p, Action("B", 0, 3, 0)) is None
    cross = produced_value(p, Action("B", 0, 3, 0))
    assert cross == produced_message(p, Action("B", 0, 3, 0)) == consumed_message(p, Action("B", 0, 2, 0))
