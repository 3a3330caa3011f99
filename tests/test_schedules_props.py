"""Property tests over schedule x D x N: programs validate and simulate; corruptions are rejected;
bitpipe is never slower than the published BitPipe order."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules import Action, Program, generate, validate
from bitpipe_fx.sim import CostModel, simulate

NAMES = ("gpipe", "1f1b", "interleaved", "zbv", "dualpipev", "chimera", "bitpipe-paper", "bitpipe")


@st.composite
def schedule_args(draw, names=NAMES) -> tuple[str, int, int, dict]:
    """A (name, D, N, options) every generator accepts; N stays small when D is large."""
    name = draw(st.sampled_from(names))
    if name in ("chimera", "bitpipe", "bitpipe-paper"):
        devices = 2 * draw(st.integers(1, 16))
    else:
        devices = draw(st.integers(1, 32))
    units = draw(st.integers(1, 3 if devices <= 8 else 1 if devices > 16 else 2))
    options: dict = {}
    if name in ("bitpipe", "bitpipe-paper"):
        n = units * devices
    elif name == "interleaved":
        options["chunks"] = draw(st.integers(2, 3))
        n = units * devices
    elif name == "dualpipev":
        n = 2 * devices + draw(st.integers(0, 3))
    elif name == "chimera":
        n = 2 * draw(st.integers(1, max(1, 24 // devices) * devices // 2 + 1))
    else:
        n = draw(st.integers(1, max(2, 48 // devices)))
    return name, devices, n, options


@given(schedule_args())
def test_every_generated_program_validates_and_simulates(args):
    name, devices, n, options = args
    program = generate(name, devices, n, **options)
    validate(program)
    report = simulate(program, CostModel(forward=1.0, backward=2.0))
    work = sum(report.busy(d) for d in range(devices))
    assert report.makespan >= work / devices
    assert work == pytest.approx(sum(1.0 if a.kind == "F" else 2.0 if a.kind == "B" else 1.0 if a.kind in "IW" else 0.0
                                     for acts in program.device_actions for a in acts))


def _compute(program: Program) -> list[tuple[int, int]]:
    return [(d, i) for d, acts in enumerate(program.device_actions) for i, a in enumerate(acts)]


def _with_row(program: Program, device: int, row: list[Action]) -> Program:
    rows = list(program.device_actions)
    rows[device] = tuple(row)
    return dataclasses.replace(program, device_actions=tuple(rows))


@given(schedule_args(), st.data())
def test_dropped_action_is_rejected(args, data):
    name, devices, n, options = args
    program = generate(name, devices, n, **options)
    d, i = data.draw(st.sampled_from(_compute(program)))
    row = list(program.actions(d))
    a = row.pop(i)
    if a.kind == "B":
        expected = f"backward of chunk ({a.pipe}, {a.stage}) for micro-batch {a.microbatch} is missing on dev{d}"
    else:
        expected = f"{a} is missing on dev{d}"
    with pytest.raises(ScheduleError) as e:
        validate(_with_row(program, d, row))
    assert expected in str(e.value)


@given(schedule_args(), st.data())
def test_duplicated_action_is_rejected(args, data):
    name, devices, n, options = args
    program = generate(name, devices, n, **options)
    d, i = data.draw(st.sampled_from(_compute(program)))
    row = list(program.actions(d))
    at = data.draw(st.integers(0, len(row)))
    row.insert(at, row[i])
    with pytest.raises(ScheduleError, match="duplicates"):
        validate(_with_row(program, d, row))


@given(schedule_args(), st.data())
def test_action_moved_before_its_local_dependency_is_rejected(args, data):
    """Move a backward, W or SYNC to just before an action of the same chunk that it must follow."""
    name, devices, n, options = args
    program = generate(name, devices, n, **options)
    choices = []
    for d, acts in enumerate(program.device_actions):
        for i, a in enumerate(acts):
            for j in range(i):
                b = acts[j]
                if b.chunk != a.chunk:
                    continue
                same_mb = b.microbatch == a.microbatch
                needs = {"B": "F", "I": "F", "W": "I"}.get(a.kind)
                if (same_mb and b.kind == needs) or (a.kind == "SYNC" and b.kind in ("B", "W")):
                    choices.append((d, i, j))
    d, i, j = data.draw(st.sampled_from(choices))
    row = list(program.actions(d))
    row.insert(j, row.pop(i))
    with pytest.raises(ScheduleError, match=r"invalid program[\s\S]*!"):
        validate(_with_row(program, d, row))


@given(schedule_args(names=("bitpipe",)), st.sampled_from([1.0, 1.5, 2.0, 3.0]))
def test_bitpipe_never_slower_than_published_order(args, ratio):
    _, devices, n, _ = args
    cost = CostModel(forward=1.0, backward=ratio)
    ours = simulate(generate("bitpipe", devices, n, forward=1.0, backward=ratio), cost)
    paper = simulate(generate("bitpipe-paper", devices, n), cost)
    assert ours.makespan <= paper.makespan + 1e-9
