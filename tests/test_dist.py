"""The distributed executor over gloo: the numerics contract for every schedule family at D=2, D=4 and
D=2 x data_parallel=2, and compile() end to end (recorded step, eager sync, resume, gather, refusal).

Spawning is the expensive part, so each process group runs many checks and returns every comparison to
the parent, which asserts. The rank bodies live in tests.support.workers.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from bitpipe_fx.runtime.launch import launch
from bitpipe_fx.schedules import SCHEDULES, Program
from bitpipe_fx.sim.trace import read_chrome_trace
from tests.support.batchnorm import batchnorm_worker
from tests.support.workers import compile_worker, contract_worker, sequence_worker

pytestmark = pytest.mark.dist
FAMILIES = sorted(SCHEDULES)


def _jobs(devices: int, dp: int, microbatches: int) -> list[tuple[str, str, int, int, int]]:
    return [(model, s, devices, microbatches, dp) for model in ("toy", "gpt", "bert") for s in FAMILIES]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    trace = str(tmp_path_factory.mktemp("two") / "trace.json")
    jobs = [*_jobs(2, 1, 4), *(("hf-gpt2", s, 2, 4, 1) for s in FAMILIES)]
    results = launch(sequence_worker, 2, args=([(contract_worker, (jobs,)), (compile_worker, (trace,))],),
                     timeout=120, join_timeout=600)
    return results, trace


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    trace = str(tmp_path_factory.mktemp("four") / "trace.json")
    jobs = _jobs(4, 1, 8) + _jobs(2, 2, 4)
    calls = [(contract_worker, (jobs,)), (compile_worker, (trace,)), (batchnorm_worker, (FAMILIES,))]
    results = launch(sequence_worker, 4, args=(calls,), timeout=120, join_timeout=600)
    return results, trace


def _check_contract(per_rank: list[list[dict]]) -> set[tuple]:
    """Every rank within 1e-12; per job, the ranks of each data-parallel pipeline cover every parameter."""
    jobs: dict[tuple, list[dict]] = defaultdict(list)
    for results in per_rank:
        for r in results:
            assert r["loss_err"] <= 1e-12 and r["grad_err"] <= 1e-12 and r["param_err"] <= 1e-12, r
            jobs[(r["model"], r["schedule"], r["devices"], r["dp"])].append(r)
    for (_, _, devices, _), results in jobs.items():
        for dp_index in {r["rank"] // devices for r in results}:
            covered = set().union(*(r["fqns"] for r in results if r["rank"] // devices == dp_index))
            assert covered == set(results[0]["all_fqns"])
    return set(jobs)


def test_two_processes_every_family_matches_the_reference(two):
    (results, _) = two
    jobs = _check_contract([r[0] for r in results])
    for model in ("gpt", "bert", "hf-gpt2"):
        assert {s for m, s, d, dp in jobs if m == model and d == 2} == set(FAMILIES)


def test_four_processes_every_family_and_data_parallel_match_the_reference(four):
    (results, _) = four
    jobs = _check_contract([r[0] for r in results])
    for devices, dp in ((4, 1), (2, 2)):
        for model in ("gpt", "bert"):
            assert {s for m, s, d, p in jobs if m == model and (d, p) == (devices, dp)} == set(FAMILIES)


@pytest.mark.parametrize("group", ["two", "four"])
def test_compile_end_to_end(group, request):
    results, trace = request.getfixturevalue(group)
    runs = [r[1] for r in results]
    world = len(runs)
    for run in runs:
        assert run["losses"] == runs[0]["losses"]  # the loss is the same on every rank
        assert run["resumed_losses"] == run["losses"][1:]  # resuming from the checkpoint is bit-identical
        assert run["identical"]
        assert f"world size {world} but devices x data_parallel = {world + 1} x 1" in run["refusal"]
        assert run["eval_loss"] == runs[0]["eval_loss"]
    assert runs[0]["full_ok"] is True
    assert runs[0]["eval_err"] <= 1e-5  # float32: evaluate() vs the gathered model run on its own
    program = Program.from_json(runs[0]["program"])
    events = read_chrome_trace(trace)
    compute = sorted((e.device, e.name) for e in events if e.kind in ("F", "B", "I", "W"))
    assert compute == sorted((d, str(a)) for d in range(world) for a in program.actions(d) if a.kind != "SYNC")
    with open(trace) as f:
        assert json.load(f)["otherData"]["schedule"] == "bitpipe"


@pytest.mark.parametrize("group", ["two", "four"])
def test_gradient_sync_is_eager(group, request):
    """Some stage's all-reduce starts before its device's last backward of another stage ends."""
    results, _ = request.getfixturevalue(group)
    timeline = results[0][1]["timeline"]
    syncs = [e for e in timeline if e.kind == "SYNC"]
    assert syncs
    eager = [
        (s, b) for s in syncs for b in timeline
        if b.device == s.device and b.kind in ("B", "I", "W") and b.stage != s.stage and b.end > s.start
    ]
    assert eager, "every all-reduce started after the device's last backward"


def test_four_processes_batch_norm_statistics_follow_the_micro_batch_order(four):
    """D=2 x data-parallel 2: each copy of a stage sees a quarter or half of the micro-batches, yet every
    copy ends each run with the running statistics of sequential accumulation over all 2N of them."""
    (results, _) = four
    covered: dict[str, set[str]] = defaultdict(set)
    for rank, per_rank in enumerate(r[2] for r in results):
        assert {job["schedule"] for job in per_rank} == set(FAMILIES)
        for job in per_rank:
            covered[job["schedule"]] |= set(job["names"])
            assert max(job["errors"].values()) <= 1e-12, (rank, job)
    for names in covered.values():
        assert {"1.running_mean", "1.running_var", "1.num_batches_tracked", "4.running_var"} <= names
