"""The heap list scheduler, the event-driven makespan and the prepared simulator give exactly what the old
rescanning implementations (tests/support/legacy_sched.py) give: same orders and times, same reports."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bitpipe_fx.errors import ScheduleError
from bitpipe_fx.schedules import SCHEDULES, generate
from bitpipe_fx.schedules.ir import Placement, bitpipe_placement, chimera_placement, linear_placement, v_placement
from bitpipe_fx.schedules.listsched import State, UnitCosts, list_schedule, makespan
from bitpipe_fx.sim import CostModel, simulate
from tests.support import legacy_sched as legacy

REPORT_FIELDS = ("name", "devices", "stages", "microbatches", "makespan", "busy_times", "compute_end", "step_end",
                 "peak_activation_units", "peak_activation_byte_counts", "weight_chunks", "weight_byte_counts",
                 "messages_cross", "local_handoffs", "bytes_moved", "events")

# the priorities of the generators (copied, so that this test does not depend on how they are written)
PRIORITIES = {
    "deepest first": lambda a, ready: (-a.stage, ready, a.kind != "B", a.microbatch),
    "deferred W": lambda a, ready: (a.kind == "W", -a.stage, ready, a.microbatch),
    "backward first": lambda a, ready: (a.kind != "B", -a.stage, ready, a.microbatch),
    "earliest, oldest": lambda a, ready: (ready, a.kind != "B", a.microbatch),
    "all equal": lambda a, ready: (),  # every tie broken by the action itself
}


def _after(lag: int):
    """Micro-batch m enters stage 0 once m - lag has its input gradient at stage 0 (monotone in time)."""
    return lambda a, state: a.kind != "F" or a.stage != 0 or a.microbatch < lag or state.finished(
        ("B/I", a.pipe, 0, a.microbatch - lag))


def _even_times(a, state: State) -> bool:
    """Forwards of stage 0 start only at even times: refuses and re-admits the same candidate."""
    return a.kind != "F" or a.stage != 0 or int(state.time) % 2 == 0


ADMITS = {"none": None, "lag 1": _after(1), "lag 2": _after(2), "even times": _even_times}


@st.composite
def placements(draw) -> tuple[Placement, tuple[int, ...]]:
    """A placement of every family's shape and a micro-batch -> pipe map."""
    devices = draw(st.sampled_from((2, 4, 6, 8)))
    n = draw(st.integers(1, 3 * devices))
    shape = draw(st.sampled_from(("linear", "interleaved", "v", "chimera", "bitpipe")))
    place = {"linear": lambda: linear_placement(devices), "interleaved": lambda: linear_placement(devices, 2),
             "v": lambda: v_placement(devices), "chimera": lambda: chimera_placement(devices),
             "bitpipe": lambda: bitpipe_placement(devices)}[shape]()
    pipe_of = tuple(draw(st.integers(0, place.pipes - 1)) for _ in range(n))
    return place, pipe_of


def _costs(draw, stages: int) -> UnitCosts:
    if draw(st.booleans()):
        return UnitCosts(draw(st.sampled_from((1.0, 0.5))), draw(st.sampled_from((1.0, 2.0, 3.0))))
    values = st.sampled_from((0.25, 0.5, 1.0, 1.5, 2.0, 2.75))
    forward = tuple(draw(values) for _ in range(stages))
    backward = tuple(draw(values) for _ in range(stages))
    return UnitCosts(forward, backward, draw(st.sampled_from((0.3, 0.5, 0.7))))


def _both(fn_new, fn_old):
    """Both results, or both ScheduleErrors (compared by their being raised; the texts differ)."""
    try:
        new = fn_new()
    except ScheduleError:
        with pytest.raises(ScheduleError):
            fn_old()
        return None, None
    return new, fn_old()


@given(placements(), st.data())
def test_list_schedule_matches_the_old_scheduler(placed, data):
    place, pipe_of = placed
    costs = _costs(data.draw, place.stages)
    priority = PRIORITIES[data.draw(st.sampled_from(sorted(PRIORITIES)))]
    admit = ADMITS[data.draw(st.sampled_from(sorted(ADMITS)))]
    split = data.draw(st.booleans())
    deferred = data.draw(st.sampled_from((None, 1, 2, place.devices))) if split else None
    args = (place, pipe_of, priority, costs, split, admit, deferred)
    new, old = _both(lambda: list_schedule(*args), lambda: legacy.list_schedule(*args))
    if new is not None:
        assert new.orders == old
        orders = new.actions()
        replayed = legacy.makespan(place, orders, costs)
        assert makespan(place, orders, costs) == makespan(place, orders, costs, pipe_of) == replayed
        assert new.replayed == replayed  # the replay timed along the list schedule


@st.composite
def programs(draw):
    """Any family's program at a D and N it accepts, with tuned options where it has them."""
    name = draw(st.sampled_from(sorted(SCHEDULES)))
    even = name in ("chimera", "bitpipe", "bitpipe-paper")
    devices = draw(st.sampled_from((2, 4, 6, 8) if even else (1, 2, 3, 4, 8)))
    if name in ("bitpipe", "bitpipe-paper", "interleaved"):
        n = devices * draw(st.integers(1, 2))
    elif name == "dualpipev":
        n = 2 * devices + draw(st.integers(0, 3))
    else:
        n = 2 * draw(st.integers(1, devices + 1))
    options = {}
    if name == "bitpipe" and draw(st.booleans()):
        options = {"forward": 1.0, "backward": draw(st.sampled_from((1.5, 3.0))), "weight_fraction": 0.4}
    return generate(name, devices, n, **options)


def _cost_model(draw, stages: int) -> CostModel:
    if draw(st.booleans()):
        return CostModel()
    values = st.sampled_from((0.0, 0.3, 1.0, 1.7, 2.5))

    def per_stage() -> tuple[float, ...]:
        return tuple(draw(values) for _ in range(stages))

    return CostModel(
        forward=per_stage(), backward=per_stage(), weight_fraction=draw(st.sampled_from((0.0, 0.35, 0.5, 1.0))),
        activation_bytes=per_stage(), param_bytes=per_stage(), p2p_latency=draw(st.sampled_from((0.0, 0.1, 0.7))),
        p2p_bandwidth=draw(st.sampled_from((1.0, 3.3, float("inf")))),
        allreduce_latency=draw(st.sampled_from((0.0, 0.2))), allreduce_bandwidth=draw(st.sampled_from((0.9, 4.0))),
        data_parallel=draw(st.sampled_from((1, 2))),
    )


@given(programs(), st.data())
def test_simulate_matches_the_old_simulator(program, data):
    cost = _cost_model(data.draw, program.stages)
    new, old = simulate(program, cost), legacy.simulate(program, cost)
    assert {f: getattr(new, f) for f in REPORT_FIELDS} == {f: old[f] for f in REPORT_FIELDS}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_family_at_a_larger_size(name):
    """D = 8 with 32 micro-batches (chimera's and the V families' valid N), comm and per-stage costs."""
    program = generate(name, 8, 32)
    s = program.stages
    cost = CostModel(forward=tuple(1 + (k % 3) / 4 for k in range(s)), backward=tuple(2 + (k % 2) for k in range(s)),
                     weight_fraction=0.4, activation_bytes=3.0, param_bytes=10.0, p2p_latency=0.1, p2p_bandwidth=20.0,
                     allreduce_latency=0.5, allreduce_bandwidth=7.0)
    for c in (CostModel(), cost):
        new, old = simulate(program, c), legacy.simulate(program, c)
        assert {f: getattr(new, f) for f in REPORT_FIELDS} == {f: old[f] for f in REPORT_FIELDS}
