"""validate(): structural checks, dependency and deadlock detection, and the marked device x step grid."""

from __future__ import annotations

import dataclasses

import pytest

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules import Action, Program, generate, validate
from bitpipe_fx.schedules.ir import chimera_placement, linear_placement
from bitpipe_fx.schedules.validate import format_grid


def edit(program: Program, device: int, actions: list[Action]) -> Program:
    rows = list(program.device_actions)
    rows[device] = tuple(actions)
    return dataclasses.replace(program, device_actions=tuple(rows))


def parse_rows(*rows: str) -> tuple[tuple[Action, ...], ...]:
    return tuple(tuple(Action.parse(t) for t in row.split()) for row in rows)


def test_valid_hand_written_program():
    program = Program("hand", linear_placement(2), (0, 0), parse_rows(
        "F0.0.0 F0.0.1 B0.0.0 B0.0.1 SYNC0.0",
        "F0.1.0 B0.1.0 F0.1.1 B0.1.1 SYNC0.1",
    ))
    validate(program)


def test_missing_backward_is_marked_at_the_end_of_its_device():
    program = Program("hand", linear_placement(2), (0,), parse_rows("F0.0.0 SYNC0.0", "F0.1.0 B0.1.0 SYNC0.1"))
    with pytest.raises(ScheduleError, match=r"backward of chunk \(0, 0\) for micro-batch 0 is missing on dev0") as e:
        validate(program)
    grid = str(e.value).splitlines()
    dev0 = next(line for line in grid if line.startswith("dev0"))
    assert "!?!" in dev0 and "F0.0.0" in dev0


def test_duplicate_wrong_device_wrong_pipe_and_range():
    place = chimera_placement(2)  # down: stage k on k; up: stage k on 1-k
    rows = parse_rows(
        "F0.0.0 F0.0.0 F1.1.1 B1.1.1 B0.0.0 SYNC0.0 SYNC1.1",
        "F1.0.1 F0.1.0 B0.1.0 B1.0.1 SYNC0.1 SYNC1.0",
    )
    with pytest.raises(ScheduleError, match=r"F0\.0\.0 on dev0 step 1 duplicates step 0 of dev0"):
        validate(Program("c", place, (0, 1), rows))
    moved = (rows[0][1:], (rows[0][0], *rows[1]))
    with pytest.raises(ScheduleError, match=r"F0\.0\.0 runs on dev1 but chunk \(0, 0\) is placed on dev0"):
        validate(Program("c", place, (0, 1), moved))
    with pytest.raises(ScheduleError, match=r"micro-batch 1 travels pipe 0"):
        validate(Program("c", place, (0, 0), (rows[0][1:], rows[1])))
    with pytest.raises(ScheduleError, match=r"micro-batch 7 outside 0\.\.1"):
        validate(Program("c", place, (0, 1), ((*rows[0][1:], Action("F", 0, 0, 7)), rows[1])))
    with pytest.raises(ScheduleError, match=r"no chunk \(pipe 2, stage 0\)"):
        validate(Program("c", place, (0, 1), ((*rows[0][1:], Action("F", 2, 0, 0)), rows[1])))


def test_both_backward_forms_and_half_split_are_refused():
    base = generate("gpipe", 1, 1)  # dev0: F0.0.0 B0.0.0 SYNC0.0
    both = edit(base, 0, [*base.actions(0)[:2], Action("I", 0, 0, 0), Action("W", 0, 0, 0), Action("SYNC", 0, 0)])
    with pytest.raises(ScheduleError, match=r"runs both B and I: use B, or I and W"):
        validate(both)
    half = edit(base, 0, [Action("F", 0, 0, 0), Action("I", 0, 0, 0), Action("SYNC", 0, 0)])
    with pytest.raises(ScheduleError, match=r"W0\.0\.0 is missing on dev0 \(its I is present\)"):
        validate(half)


def test_sync_before_last_backward_and_missing_sync():
    program = generate("1f1b", 2, 2)
    acts = list(program.actions(0))
    sync = acts.pop()
    early = edit(program, 0, [acts[0], sync, *acts[1:]])
    with pytest.raises(ScheduleError, match=r"SYNC0\.0 on dev0 at step 1 comes before backward B0\.0\.1"):
        validate(early)
    with pytest.raises(ScheduleError, match=r"SYNC0\.0 is missing on dev0"):
        validate(edit(program, 0, acts))


def test_local_dependency_order_is_checked():
    program = generate("1f1b", 2, 2)  # dev1: F0.1.0 B0.1.0 F0.1.1 B0.1.1 SYNC0.1
    acts = list(program.actions(1))
    acts[2], acts[3] = acts[3], acts[2]
    needs = r"dev1 cannot run B0\.1\.1: it needs F0\.1\.1 \(dev1, later on this device\)"
    with pytest.raises(ScheduleError, match=needs):
        validate(edit(program, 1, acts))


def test_cross_device_receive_cycle_is_a_deadlock():
    """Each device first waits for an activation the other sends only later: blocking receives deadlock."""
    program = Program("cycle", chimera_placement(2), (0, 1), parse_rows(
        "F1.1.1 F0.0.0 B1.1.1 B0.0.0 SYNC0.0 SYNC1.1",
        "F0.1.0 F1.0.1 B0.1.0 B1.0.1 SYNC0.1 SYNC1.0",
    ))
    with pytest.raises(ScheduleError) as e:
        validate(program)
    text = str(e.value)
    assert "dev0 blocks receiving act1.0.1 from dev1" in text
    assert "dev1 blocks receiving act0.0.0 from dev0" in text
    assert "!F1.1.1!" in text and "!F0.1.0!" in text


def test_grid_shows_only_columns_near_the_marks():
    program = generate("gpipe", 2, 20)
    grid = format_grid(program, {(1, 30): "x"})
    header = grid.splitlines()[0].split()
    assert header[0] == "step" and header[1:] == ["28", "29", "30", "31"]
    assert "!B0.1.10!" in grid.splitlines()[2]
