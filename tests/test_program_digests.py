"""Every family's generated program and its simulated makespans are exactly those of the implementation before
the speed rewrite (tests/support/program_digests.json, written by integ at ebe177d with this file's sizes and
costs): the faster list scheduler, replay, comm lowering and simulator change no order and no time."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bitpipe_fx.schedules import generate
from bitpipe_fx.sim import CostModel, simulate

SAVED = json.loads((Path(__file__).parent / "support" / "program_digests.json").read_text())["programs"]


def uneven_costs(stages: int) -> CostModel:
    """Per-stage compute, message and all-reduce costs (the ones the saved digests were made with)."""
    return CostModel(forward=tuple(1 + (k % 3) / 4 for k in range(stages)),
                     backward=tuple(2 + (k % 2) for k in range(stages)), weight_fraction=0.4, activation_bytes=3.0,
                     param_bytes=10.0, p2p_latency=0.1, p2p_bandwidth=20.0, allreduce_latency=0.5,
                     allreduce_bandwidth=7.0)


@pytest.mark.parametrize("label", sorted(SAVED))
def test_program_and_makespans_match_the_old_implementation(label):
    name, d, n, mode = label.split()
    devices, microbatches = int(d[2:]), int(n[2:])
    costs = uneven_costs(generate(name, devices, microbatches).stages)
    program = generate(name, devices, microbatches, costs=costs if mode == "costed" else None)
    saved = SAVED[label]
    assert hashlib.sha256(program.to_json().encode()).hexdigest() == saved["sha256"]
    assert simulate(program).makespan == saved["makespan_unit"]
    assert simulate(program, costs).makespan == saved["makespan_costed"]
