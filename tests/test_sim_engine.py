"""The event simulator on hand-built programs whose timelines are worked out by hand in the comments."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from bitpipe_fx.errors import ConfigError, ScheduleError
from bitpipe_fx.schedules import Action, Program, generate
from bitpipe_fx.schedules.ir import Placement, chimera_placement, linear_placement, v_placement
from bitpipe_fx.sim import CostModel, simulate


def prog(placement: Placement, rows: list[str], pipe_of: tuple[int, ...] = (0,), name: str = "hand") -> Program:
    """Program from one space-separated action string per device."""
    return Program(name, placement, pipe_of, tuple(tuple(Action.parse(t) for t in r.split()) for r in rows))


def spans(report, device: int) -> dict[str, tuple[float, float]]:
    return {e.name: (e.start, e.end) for e in report.events if e.device == device and e.kind in ("F", "B", "I", "W")}


TWO_STAGE = ["F0.0.0 B0.0.0 SYNC0.0", "F0.1.0 B0.1.0 SYNC0.1"]


def test_two_stages_with_latency():
    # dev0 F [0,1]; act arrives 1.5; dev1 F [1.5,2.5] B [2.5,4.5]; grad arrives 5; dev0 B [5,7]
    r = simulate(prog(linear_placement(2), TWO_STAGE), CostModel(forward=1, backward=2, p2p_latency=0.5))
    assert spans(r, 1) == {"F0.1.0": (1.5, 2.5), "B0.1.0": (2.5, 4.5)}
    assert spans(r, 0) == {"F0.0.0": (0, 1), "B0.0.0": (5, 7)}
    assert r.makespan == 7
    assert r.busy(0) == r.busy(1) == 3
    assert r.idle(0) == r.idle(1) == 4
    assert r.bubble_ratio == pytest.approx(4 / 7)
    assert r.bubble_over_ideal == pytest.approx(4 / 3)
    assert (r.messages_cross, r.local_handoffs) == (2, 0)


def test_bandwidth_and_message_sizes():
    # both messages carry stage 0's output (act of stage 0, grad into stage 0): 4 bytes, 0.5 + 4/2 = 2.5 each
    cost = CostModel(forward=1, backward=2, activation_bytes=(4.0, 100.0), p2p_latency=0.5, p2p_bandwidth=2.0)
    r = simulate(prog(linear_placement(2), TWO_STAGE), cost)
    assert spans(r, 1)["F0.1.0"] == (3.5, 4.5)
    assert spans(r, 0)["B0.0.0"] == (9, 11)
    assert r.makespan == 11
    assert r.bytes_moved == 8
    sends = sorted((e.name, e.start, e.end) for e in r.events if e.kind == "SEND")
    assert sends == [("act0.0.0:0->1", 1, 3.5), ("grad0.1.0:1->0", 6.5, 9)]


def test_local_handoff_at_v_turn_is_free():
    # V over 2 devices: stages 0,1,2,3 on devices 0,1,1,0; latency 1 on each cross-device hop only
    rows = ["F0.0.0 F0.3.0 B0.3.0 B0.0.0", "F0.1.0 F0.2.0 B0.2.0 B0.1.0"]
    r = simulate(prog(v_placement(2), rows), CostModel(forward=1, backward=2, p2p_latency=1))
    assert spans(r, 1) == {"F0.1.0": (2, 3), "F0.2.0": (3, 4), "B0.2.0": (9, 11), "B0.1.0": (11, 13)}
    assert spans(r, 0) == {"F0.0.0": (0, 1), "F0.3.0": (5, 6), "B0.3.0": (6, 8), "B0.0.0": (14, 16)}
    assert r.makespan == 16
    assert (r.messages_cross, r.local_handoffs) == (4, 2)
    assert r.weight_copies(0) == r.weight_copies(1) == 2


# Chimera over 2 devices, micro-batch 0 down (stages on 0, 1), micro-batch 1 up (stages on 1, 0).
# F = 1, B = 2, free p2p. dev0: F0.0.0 [0,1] F1.1.1 [1,2] B1.1.1 [2,4] B0.0.0 [4,6]
#                       dev1: F1.0.1 [0,1] F0.1.0 [1,2] B0.1.0 [2,4] B1.0.1 [4,6]
# all-reduce stage 0 (bytes 6): 0.5 + 2·(1/2)·6/3 = 2.5; stage 1 (bytes 12): 0.5 + 12/3 = 4.5
CHIMERA_EAGER = ["F0.0.0 F1.1.1 B1.1.1 SYNC1.1 B0.0.0 SYNC0.0", "F1.0.1 F0.1.0 B0.1.0 SYNC0.1 B1.0.1 SYNC1.0"]
CHIMERA_LATE = ["F0.0.0 F1.1.1 B1.1.1 SYNC1.1 B0.0.0 SYNC0.0", "F1.0.1 F0.1.0 B0.1.0 B1.0.1 SYNC0.1 SYNC1.0"]
AR_COST = dict(forward=1, backward=2, param_bytes=(6.0, 12.0), allreduce_latency=0.5, allreduce_bandwidth=3.0)


def test_allreduce_alpha_beta_eager():
    r = simulate(prog(chimera_placement(2), CHIMERA_EAGER, (0, 1)), CostModel(**AR_COST))
    ar = sorted((e.device, e.name, e.start, e.end) for e in r.events if e.kind == "SYNC")
    # stage 1 starts at 4 (both replicas synced at 4), stage 0 at 6
    assert ar == [(0, "SYNC0.0", 6, 8.5), (0, "SYNC1.1", 4, 8.5), (1, "SYNC0.1", 4, 8.5), (1, "SYNC1.0", 6, 8.5)]
    assert r.makespan == 8.5
    assert r.exposed_allreduce == 2.5
    assert r.weight_bytes(0) == r.weight_bytes(1) == 18


def test_allreduce_waits_for_last_member():
    # dev1 syncs stage 1 only at 6: that all-reduce runs [6, 10.5]
    r = simulate(prog(chimera_placement(2), CHIMERA_LATE, (0, 1)), CostModel(**AR_COST))
    assert r.makespan == 10.5
    assert r.exposed_allreduce == 4.5
    assert r.idle(0) == 10.5 - 6


def test_allreduce_data_parallel_group():
    # n = 2 replicas x 2 data-parallel = 4: stage 1 takes 0.5 + 2·(3/4)·12/3 = 6.5 from 4
    r = simulate(prog(chimera_placement(2), CHIMERA_EAGER, (0, 1)), CostModel(**AR_COST, data_parallel=2))
    assert r.makespan == 10.5


def test_single_replica_group_is_free_unless_data_parallel():
    cost = dict(forward=1, backward=2, param_bytes=8.0, allreduce_latency=5.0, allreduce_bandwidth=2.0)
    base = simulate(prog(linear_placement(2), TWO_STAGE), CostModel(forward=1, backward=2))
    alone = simulate(prog(linear_placement(2), TWO_STAGE), CostModel(**cost))
    assert alone.makespan == base.makespan == 6 and alone.exposed_allreduce == 0
    # dp = 2: 5 + 2·(1/2)·8/2 = 9 after each device's SYNC (dev0 at 6, dev1 at 4)
    dp = simulate(prog(linear_placement(2), TWO_STAGE), CostModel(**cost, data_parallel=2))
    assert dp.makespan == 15 and dp.exposed_allreduce == 9


def test_split_backward_costs_and_activation_peak():
    # one device, one stage; wf = 0.25: I = 1.5, W = 0.5; activations held from F until W
    rows = ["F0.0.0 F0.0.1 I0.0.0 I0.0.1 W0.0.0 F0.0.2 W0.0.1 I0.0.2 W0.0.2 SYNC0.0"]
    cost = CostModel(forward=1, backward=2, weight_fraction=0.25, activation_bytes=3.0)
    r = simulate(prog(linear_placement(1), rows, (0, 0, 0)), cost)
    durations = {e.name: e.duration for e in r.events if e.kind in ("F", "B", "I", "W")}
    assert durations["I0.0.1"] == 1.5 and durations["W0.0.1"] == 0.5 and durations["F0.0.2"] == 1
    assert r.makespan == 9 and r.idle(0) == 0
    assert r.peak_activations(0) == 2
    assert r.peak_activation_bytes(0) == 6


def test_peak_activations_gpipe_vs_1f1b_order():
    gpipe = ["F0.0.0 F0.0.1 F0.0.2 B0.0.0 B0.0.1 B0.0.2", "F0.1.0 B0.1.0 F0.1.1 B0.1.1 F0.1.2 B0.1.2"]
    ofob = ["F0.0.0 F0.0.1 B0.0.0 F0.0.2 B0.0.1 B0.0.2", gpipe[1]]
    assert simulate(prog(linear_placement(2), gpipe, (0, 0, 0))).peak_activations(0) == 3
    r = simulate(prog(linear_placement(2), ofob, (0, 0, 0)))
    assert (r.peak_activations(0), r.peak_activations(1)) == (2, 1)


@pytest.mark.parametrize(("devices", "microbatches"), [(2, 2), (4, 8), (8, 16), (5, 3)])
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_published_bubble_with_equal_costs(name, devices, microbatches):
    r = simulate(generate(name, devices, microbatches), CostModel(forward=1, backward=1))
    assert r.bubble_ratio == pytest.approx((devices - 1) / (microbatches + devices - 1))
    assert r.bubble_over_ideal == pytest.approx((devices - 1) / microbatches)
    assert r.makespan == pytest.approx(2 * (microbatches + devices - 1))


def test_1f1b_holds_fewer_activations_than_gpipe():
    g, o = (simulate(generate(n, 4, 8)) for n in ("gpipe", "1f1b"))
    assert [g.peak_activations(d) for d in range(4)] == [8] * 4
    assert [o.peak_activations(d) for d in range(4)] == [4, 3, 2, 1]


def test_latency_never_helps():
    program = generate("1f1b", 4, 8)
    free = simulate(program, CostModel()).makespan
    assert simulate(program, CostModel(p2p_latency=0.25)).makespan > free


# ---- errors --------------------------------------------------------------------------------------


def test_deadlock_names_stuck_actions():
    # each device first waits for the other's forward
    rows = ["F1.1.1 F0.0.0 B1.1.1 B0.0.0", "F0.1.0 F1.0.1 B0.1.0 B1.0.1"]
    with pytest.raises(ScheduleError, match="deadlocks") as info:
        simulate(prog(chimera_placement(2), rows, (0, 1)))
    msg = str(info.value)
    assert "device 0 stuck at step 0 (F1.1.1) waiting for message act1.0.1:1->0" in msg
    assert "device 1 stuck at step 0 (F0.1.0) waiting for message act0.0.0:0->1" in msg


def test_local_order_violation_is_a_deadlock():
    rows = ["F0.0.0 B0.0.0", "B0.1.0 F0.1.0"]
    with pytest.raises(ScheduleError, match=r"device 1 stuck at step 0 \(B0.1.0\) waiting for F0.1.0"):
        simulate(prog(linear_placement(2), rows))


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        (["F0.0.0 B0.0.0 F0.0.0", "F0.1.0 B0.1.0"], r"F0.0.0 on device 0 repeats work"),
        (["F0.0.0 B0.0.0 F0.1.0", "B0.1.0"], r"F0.1.0 is on device 0 but the placement puts \(0, 1\) on device 1"),
        (["F0.0.0 SYNC0.0 B0.0.0", "F0.1.0 B0.1.0"], r"B0.0.0 on device 0 runs after SYNC0.0"),
        (["F0.0.0 B0.0.0 SYNC0.0 SYNC0.0", "F0.1.0 B0.1.0"], r"SYNC0.0 appears twice on device 0"),
        (["F0.0.0 B0.0.0 F0.2.0", "F0.1.0 B0.1.0"], r"names chunk \(0, 2\), which the placement lacks"),
    ],
)
def test_inconsistent_programs_are_refused(rows, pattern):
    with pytest.raises(ScheduleError, match=pattern):
        simulate(prog(linear_placement(2), rows))


def test_missing_replica_sync():
    rows = ["F0.0.0 F1.1.1 B1.1.1 SYNC1.1 B0.0.0 SYNC0.0", "F1.0.1 F0.1.0 B0.1.0 B1.0.1 SYNC1.0"]
    with pytest.raises(ScheduleError, match=r"all-reduce of stage 1 never starts: SYNC0.1 \(device 1\) is missing"):
        simulate(prog(chimera_placement(2), rows, (0, 1)))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(weight_fraction=1.5), r"weight_fraction must lie in \[0, 1\], got 1.5"),
        (dict(p2p_bandwidth=0.0), r"p2p_bandwidth must be > 0"),
        (dict(forward=(1.0, -1.0)), r"forward must be a non-negative number"),
        (dict(data_parallel=0), r"data_parallel must be a positive integer, got 0"),
        (dict(allreduce_latency=math.nan), r"allreduce_latency must be >= 0"),
    ],
)
def test_cost_model_refuses_bad_values(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        CostModel(**kwargs)


def test_per_stage_length_must_match():
    with pytest.raises(ConfigError, match=r"CostModel\.backward has 3 entries but the program has 2 stages"):
        simulate(prog(linear_placement(2), TWO_STAGE), CostModel(backward=(1.0, 2.0, 3.0)))


def test_scaled_halves_compute_and_params_not_activations():
    c = CostModel(forward=(2.0, 4.0), backward=4.0, activation_bytes=8.0, param_bytes=10.0).scaled(0.5)
    assert (c.forward, c.backward, c.activation_bytes, c.param_bytes) == ((1.0, 2.0), 2.0, 8.0, 5.0)


def test_sim_does_not_import_torch():
    code = "import bitpipe_fx.sim, bitpipe_fx.sim.command, bitpipe_fx.sim.plot, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# DESIGN.md's published BitPipe order for D = 4, N = 4 (1-based micro-batches; F1u3 = forward of the first-half
# chunk of the up pipe for micro-batch 3; S23 / S01 = syncs of the second-half / first-half chunks).
PUBLISHED_BITPIPE = """
F1d1 F1d2 F1u3 F2u3 F1u4 F2u4 F2d1 B2d1 F2d2 B2d2 B2u3 B1u3 B2u4 B1u4 B1d1 S23 B1d2 S01
F1d1 F1u3 F1d2 F1u4 F2u3 F2d1 F2u4 F2d2 B2d1 B2u3 B2d2 B2u4 B1u3 B1d1 B1u4 B1d2 S23 S01
F1u3 F1d1 F1u4 F1d2 F2d1 F2u3 F2d2 F2u4 B2u3 B2d1 B2u4 B2d2 B1d1 B1u3 B1d2 B1u4 S23 S01
F1u3 F1u4 F1d1 F2d1 F1d2 F2d2 F2u3 B2u3 F2u4 B2u4 B2d1 B1d1 B2d2 B1d2 B1u3 S23 B1u4 S01
"""


def published_bitpipe(devices: int = 4) -> Program:
    """Transcribe the listing into actions on bitpipe_placement(4), independently of any generator."""
    from bitpipe_fx.schedules.ir import bitpipe_placement

    def chunk(d: int, half: str, pipe: int) -> int:
        if pipe == 0:
            return d if half == "1" else 2 * devices - 1 - d
        return devices - 1 - d if half == "1" else devices + d

    rows = []
    for d, line in enumerate(PUBLISHED_BITPIPE.split("\n")[1:-1]):
        acts = []
        for tok in line.split():
            if tok.startswith("S"):
                half = "2" if tok == "S23" else "1"
                acts += [Action("SYNC", 0, chunk(d, half, 0)), Action("SYNC", 1, chunk(d, half, 1))]
            else:
                pipe = 0 if tok[2] == "d" else 1
                acts.append(Action(tok[0], pipe, chunk(d, tok[1], pipe), int(tok[3]) - 1))
        rows.append(tuple(acts))
    return Program("published", bitpipe_placement(devices), (0, 0, 1, 1), tuple(rows))


def test_published_bitpipe_reference_timing():
    # DESIGN.md: 28 units with F = 1, B = 2 per chunk and free communication, 4 idle units per device
    r = simulate(published_bitpipe(), CostModel(forward=1, backward=2))
    assert r.makespan == 28
    assert [r.idle(d) for d in range(4)] == [4, 4, 4, 4]
    assert [r.weight_copies(d) for d in range(4)] == [4, 4, 4, 4]
    # 8 stages x 2 replicas (devices d and 3-d): one all-reduce interval per chunk
    assert len([e for e in r.events if e.kind == "SYNC"]) == 16
    assert r.local_handoffs == 4 * 2  # the V turn of each micro-batch, forward and backward
