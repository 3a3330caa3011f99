"""Schedule generators: placement, counts, eager syncs, the published listing and figures, refusals."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules import SCHEDULES, Action, Program, generate, validate
from bitpipe_fx.schedules.ir import bitpipe_placement, chimera_placement, linear_placement, v_placement
from bitpipe_fx.sim import CostModel, simulate

NAMES = ("gpipe", "1f1b", "interleaved", "zbv", "dualpipev", "chimera", "bitpipe-paper", "bitpipe")

# (name, D, N, options) that every generator accepts
CASES = [
    ("gpipe", 4, 6, {}),
    ("1f1b", 4, 6, {}),
    ("1f1b", 3, 2, {}),
    ("interleaved", 4, 8, {}),
    ("interleaved", 3, 6, {"chunks": 3}),
    ("zbv", 4, 8, {}),
    ("zbv", 4, 3, {}),
    ("dualpipev", 4, 8, {}),
    ("dualpipev", 3, 9, {}),
    ("chimera", 4, 8, {}),
    ("bitpipe-paper", 4, 8, {}),
    ("bitpipe", 6, 12, {}),
]


def expected_placement(name: str, devices: int, options: dict):
    """DESIGN.md's placement of each family, written out independently of the generators."""
    if name in ("gpipe", "1f1b"):
        return ((tuple(range(devices))),)
    if name == "interleaved":
        v = options.get("chunks", 2)
        return (tuple(k % devices for k in range(v * devices)),)
    if name in ("zbv", "dualpipev"):
        return (tuple(k if k < devices else 2 * devices - 1 - k for k in range(2 * devices)),)
    if name == "chimera":
        return (tuple(range(devices)), tuple(devices - 1 - k for k in range(devices)))
    down = tuple(k if k < devices else 2 * devices - 1 - k for k in range(2 * devices))
    up = tuple(devices - 1 - k if k < devices else k - devices for k in range(2 * devices))
    return (down, up)


def expected_pipe_of(name: str, devices: int, n: int) -> tuple[int, ...]:
    if name == "chimera":
        return tuple(0 if m < n // 2 else 1 for m in range(n))
    if name.startswith("bitpipe"):
        return tuple(0 if m % devices < devices // 2 else 1 for m in range(n))
    return (0,) * n


def test_registry_holds_every_family():
    assert set(NAMES) <= set(SCHEDULES)


@pytest.mark.parametrize(("name", "devices", "n", "options"), CASES)
def test_placement_pipe_map_and_counts(name, devices, n, options):
    program = generate(name, devices, n, **options)
    assert program.name == name
    assert program.placement.table == expected_placement(name, devices, options)
    assert program.pipe_of == expected_pipe_of(name, devices, n)
    per_pipe = Counter(program.pipe_of)
    for d in range(devices):
        counts = Counter((a.kind, a.pipe, a.stage) for a in program.actions(d))
        chunks = [(p, s) for p, row in enumerate(program.placement.table) for s, dev in enumerate(row) if dev == d]
        for p, s in chunks:
            mbs = per_pipe[p]
            assert counts["F", p, s] == mbs
            assert counts["SYNC", p, s] == 1
            if name in ("zbv", "bitpipe"):
                assert counts["B", p, s] == 0 and counts["I", p, s] == counts["W", p, s] == mbs
            elif name == "dualpipev":
                assert counts["I", p, s] == counts["W", p, s] and counts["B", p, s] + counts["I", p, s] == mbs
            else:
                assert counts["B", p, s] == mbs and counts["I", p, s] == counts["W", p, s] == 0
        assert sum(counts.values()) == sum(1 for _ in program.actions(d))
        assert all((p, s) in chunks for (_, p, s) in counts)
    validate(program)


@pytest.mark.parametrize(("name", "devices", "n", "options"), [c for c in CASES if c[0] != "bitpipe-paper"])
def test_sync_right_after_last_backward(name, devices, n, options):
    """Every generator but the published BitPipe issues each chunk's SYNC right after its last B/W."""
    program = generate(name, devices, n, **options)
    for d in range(devices):
        acts = program.actions(d)
        for i, a in enumerate(acts):
            if a.kind != "SYNC":
                continue
            last = max(j for j, b in enumerate(acts) if b.chunk == a.chunk and b.kind in ("B", "W"))
            assert last < i and all(b.kind == "SYNC" for b in acts[last + 1 : i]), (d, str(a))


def test_generators_are_deterministic_and_round_trip():
    for name, devices, n, options in CASES:
        a, b = generate(name, devices, n, **options), generate(name, devices, n, **options)
        assert a == b
        assert Program.from_json(a.to_json()) == a


# ---- the published BitPipe order (DESIGN.md) ------------------------------------------------------

DESIGN_LISTING = """
dev0: F1d1 F1d2 F1u3 F2u3 F1u4 F2u4 F2d1 B2d1 F2d2 B2d2 B2u3 B1u3 B2u4 B1u4 B1d1 S23 B1d2 S01
dev1: F1d1 F1u3 F1d2 F1u4 F2u3 F2d1 F2u4 F2d2 B2d1 B2u3 B2d2 B2u4 B1u3 B1d1 B1u4 B1d2 S23 S01
dev2: F1u3 F1d1 F1u4 F1d2 F2d1 F2u3 F2d2 F2u4 B2u3 B2d1 B2u4 B2d2 B1d1 B1u3 B1d2 B1u4 S23 S01
dev3: F1u3 F1u4 F1d1 F2d1 F1d2 F2d2 F2u3 B2u3 F2u4 B2u4 B2d1 B1d1 B2d2 B1d2 B1u3 S23 B1u4 S01
"""


def parse_design_listing(text: str, devices: int) -> list[list[Action]]:
    """DESIGN.md's 1-based notation: F1u3 = forward, first-half chunk, up pipe, micro-batch 3; S23/S01 = the
    syncs of the second-half / first-half chunks (down pipe's, then up pipe's)."""
    rows = []
    for line in text.strip().splitlines():
        label, ops = line.split(":")
        d = int(label.removeprefix("dev"))
        stage = {("d", 1): d, ("d", 2): 2 * devices - 1 - d, ("u", 1): devices - 1 - d, ("u", 2): devices + d}
        row: list[Action] = []
        for tok in ops.split():
            if tok in ("S23", "S01"):
                half = 2 if tok == "S23" else 1
                row += [Action("SYNC", 0, stage["d", half]), Action("SYNC", 1, stage["u", half])]
                continue
            kind, half, pipe, mb = re.fullmatch(r"([FB])([12])([du])(\d+)", tok).groups()
            row.append(Action(kind, 0 if pipe == "d" else 1, stage[pipe, int(half)], int(mb) - 1))
        rows.append(row)
    return rows


def test_bitpipe_paper_equals_design_listing_op_for_op():
    program = generate("bitpipe-paper", 4, 4)
    expected = parse_design_listing(DESIGN_LISTING, 4)
    for d in range(4):
        assert list(program.actions(d)) == expected[d], f"dev{d}"


def test_bitpipe_paper_d4_n4_runs_28_units_with_4_idle_per_device():
    report = simulate(generate("bitpipe-paper", 4, 4), CostModel(forward=1.0, backward=2.0))
    assert report.makespan == pytest.approx(28.0)
    assert [report.idle(d) for d in range(4)] == pytest.approx([4.0] * 4)


@pytest.mark.parametrize("devices", [4, 6, 8])
@pytest.mark.parametrize("units", [1, 2, 3])
@pytest.mark.parametrize(("tf", "tb"), [(1.0, 1.0), (1.0, 2.0), (1.0, 3.0), (2.0, 1.0)])
def test_bitpipe_paper_idle_matches_design_formula(devices, units, tf, tb):
    """DESIGN.md: idle per device = (D-2)·max(tf, tb) + (N/D-1)·(D-2)·|tb-tf| in the published order."""
    n = units * devices
    report = simulate(generate("bitpipe-paper", devices, n), CostModel(forward=tf, backward=tb))
    expected = (devices - 2) * max(tf, tb) + (units - 1) * (devices - 2) * abs(tb - tf)
    assert max(report.idle(d) for d in range(devices)) == pytest.approx(expected)


# ---- published bubble figures ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("devices", "n"), [(2, 1), (4, 4), (4, 8), (8, 16), (5, 3)])
def test_gpipe_1f1b_bubble(name, devices, n):
    report = simulate(generate(name, devices, n), CostModel(forward=1.0, backward=1.0))
    assert report.bubble_ratio == pytest.approx((devices - 1) / (n + devices - 1))


@pytest.mark.parametrize(("devices", "n", "v"), [(4, 4, 2), (4, 8, 2), (4, 12, 3), (8, 16, 2), (2, 6, 4)])
def test_interleaved_bubble(devices, n, v):
    report = simulate(generate("interleaved", devices, n, chunks=v), CostModel(forward=1.0, backward=1.0))
    assert report.bubble_ratio == pytest.approx((devices - 1) / (v * n + devices - 1))


@pytest.mark.parametrize("devices", [4, 8])
@pytest.mark.parametrize("units", [1, 2, 4])
def test_chimera_bubble(devices, units):
    """Chimera with F = B: D-2 idle slots per device out of 2N + D - 2, for N = D and concatenated units."""
    n = units * devices
    program = generate("chimera", devices, n, forward=1.0, backward=1.0)
    report = simulate(program, CostModel(forward=1.0, backward=1.0))
    assert report.bubble_ratio == pytest.approx((devices - 2) / (2 * n + devices - 2))


def test_chimera_beats_1f1b_with_slower_backward():
    cost = CostModel(forward=1.0, backward=2.0)
    for devices, n in ((4, 8), (8, 16), (8, 32)):
        ours = simulate(generate("chimera", devices, n), cost)
        assert ours.makespan < simulate(generate("1f1b", devices, n), cost).makespan
        assert max(ours.peak_activations(d) for d in range(devices)) <= 2 * devices


# ---- bitpipe vs the published order ---------------------------------------------------------------


@pytest.mark.parametrize("devices", [4, 6, 8])
@pytest.mark.parametrize("tb", [1.5, 2.0, 3.0])
def test_bitpipe_idle_does_not_grow_with_n(devices, tb):
    cost = CostModel(forward=1.0, backward=tb)
    idle = []
    for units in (1, 2, 3, 4):
        report = simulate(generate("bitpipe", devices, units * devices, forward=1.0, backward=tb), cost)
        idle.append(max(report.idle(d) for d in range(devices)))
    assert max(idle[1:]) <= idle[0] + 1e-9
    paper = simulate(generate("bitpipe-paper", devices, 4 * devices), cost)
    assert idle[-1] < max(paper.idle(d) for d in range(devices)) / 2


def test_bitpipe_inflight_one_keeps_paper_memory_budget_close():
    """inflight=1 admits micro-batch m only after m-D left stage 0, like the paper."""
    cost = CostModel(forward=1.0, backward=2.0)
    ours = simulate(generate("bitpipe", 8, 32, inflight=1), cost)
    paper = simulate(generate("bitpipe-paper", 8, 32), cost)
    assert ours.makespan < paper.makespan
    assert max(ours.peak_activations(d) for d in range(8)) <= 1.5 * max(paper.peak_activations(d) for d in range(8))


# ---- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "devices", "n", "options", "pattern"),
    [
        ("bitpipe", 5, 10, {}, r"even number of devices, got devices=5; use 4 or 6"),
        ("bitpipe-paper", 4, 6, {}, r"multiple of devices=4, got microbatches=6; use 4 or 8"),
        ("bitpipe", 4, 3, {}, r"multiple of devices=4, got microbatches=3; use 4$"),
        ("bitpipe", 4, 8, {"inflight": 0}, r"inflight must be a positive integer.*got 0"),
        ("bitpipe", 4, 8, {"backward": -1.0}, r"backward > 0.*backward=-1.0"),
        ("interleaved", 4, 6, {}, r"multiple of devices=4, got microbatches=6; use 4 or 8"),
        ("interleaved", 4, 8, {"chunks": 1}, r"chunks >= 2, got chunks=1; use '1f1b'"),
        ("dualpipev", 4, 7, {}, r"microbatches >= 2\*devices = 8, got microbatches=7"),
        ("chimera", 3, 4, {}, r"even number of devices, got devices=3; use 2 or 4"),
        ("chimera", 4, 5, {}, r"even number of micro-batches.*got microbatches=5; use 4 or 6"),
    ],
)
def test_constraints_are_refused_with_the_fix(name, devices, n, options, pattern):
    with pytest.raises(ScheduleError, match=pattern):
        generate(name, devices, n, **options)


def test_placement_helpers_agree_with_expected_tables():
    assert linear_placement(4).table == expected_placement("1f1b", 4, {})
    assert v_placement(4).table == expected_placement("zbv", 4, {})
    assert chimera_placement(4).table == expected_placement("chimera", 4, {})
    assert bitpipe_placement(4).table == expected_placement("bitpipe", 4, {})


def test_bitpipe_takes_per_stage_costs_like_the_cost_model():
    """Unbalanced stages: tuned with the same per-stage costs it is simulated with, bitpipe beats the paper."""
    devices, n = 4, 8
    forward = tuple(0.5 + 0.125 * k for k in range(2 * devices))
    backward = tuple(2.0 * f + (0.5 if k % 3 == 0 else 0.0) for k, f in enumerate(forward))
    cost = CostModel(forward=forward, backward=backward)
    ours = simulate(generate("bitpipe", devices, n, forward=forward, backward=list(backward)), cost)
    paper = simulate(generate("bitpipe-paper", devices, n), cost)
    assert ours.makespan < paper.makespan
    with pytest.raises(ScheduleError, match=r"forward costs have 2 entries but the schedule has 8 stages"):
        generate("bitpipe", devices, n, forward=(1.0, 2.0))
