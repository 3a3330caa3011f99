"""Partition: balance on a real model (checked with torch's own FLOP counter), optimality against brute force,
determinism, the bytes tie-break, and the S-too-large error."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bitpipe_fx.errors import PartitionError
from bitpipe_fx.examples.models import gpt
from bitpipe_fx.passes import CostTable, NodeCost, capture, estimate_costs, partition, split
from bitpipe_fx.schedules.ir import (
    Placement,
    bitpipe_placement,
    chimera_placement,
    linear_placement,
    v_placement,
)


@pytest.fixture(scope="module")
def gpt16():
    """The 16-block uniform GPT-style model of the balance targets."""
    model, example = gpt(layers=16, dim=64, heads=4, seq=32, vocab=128)
    captured = capture(model, example)
    return model, example, captured, estimate_costs(captured)


def _counted_stage_flops(split_model, example) -> list[int]:
    """FLOPs per stage as torch.utils.flop_counter counts them while the stages actually run."""
    inputs = dict(zip(split_model.input_names, split_model.flatten_inputs(example, {})))
    carried: tuple = ()
    flops = []
    for stage, spec in zip(split_model.stages, split_model.specs):
        with FlopCounterMode(display=False) as counter:
            carried = stage(*(inputs[n] for n in spec.model_inputs), *carried)
        flops.append(counter.get_total_flops())
    return flops


def _device_loads(stage_loads, placement: Placement) -> list[float]:
    loads = [0.0] * placement.devices
    for row in placement.table:
        for s, d in enumerate(row):
            loads[d] += stage_loads[s]
    return loads


def test_gpt16_on_1f1b_placement_is_balanced(gpt16):
    _model, example, captured, costs = gpt16
    placement = linear_placement(8)
    part = partition(costs, placement)
    sm = split(captured, part)
    assert part.stages == 8
    # stage 0 holds the embedding, stage 7 the LM head (the tied weight is shared by exactly those two)
    assert sm.shared == {"tok_emb.weight": (0, 7)}
    for loads in (_device_loads(_counted_stage_flops(sm, example), placement), part.device_loads):
        assert max(loads) / (sum(loads) / len(loads)) <= 1.10


def test_gpt16_on_bitpipe_placement_balances_the_four_chunks_of_every_device(gpt16):
    _model, example, captured, costs = gpt16
    placement = bitpipe_placement(4)
    part = partition(costs, placement)
    sm = split(captured, part)
    assert part.stages == 8
    assert sm.shared == {"tok_emb.weight": (0, 7)}
    for d in range(4):
        assert len(placement.chunks(d)) == 4
    for loads in (_device_loads(_counted_stage_flops(sm, example), placement), part.device_loads):
        assert max(loads) / min(loads) <= 1.10


def test_partition_is_deterministic_across_fresh_captures(gpt16):
    _, _, _, costs = gpt16
    model, example = gpt(layers=16, dim=64, heads=4, seq=32, vocab=128)
    again = estimate_costs(capture(model, example))
    for placement in (linear_placement(8), bitpipe_placement(4), v_placement(4)):
        assert partition(costs, placement) == partition(again, placement)


def test_cuts_never_split_a_tuple_from_its_getitems(gpt16):
    _, _, _captured, costs = gpt16
    for stages in (3, 8, 16, 32):
        part = partition(costs, stages)
        assert all(costs.cuttable[c - 1] for c in part.cuts)
        for k, node in enumerate(costs.nodes[:-1]):
            if not node.is_tensor:  # e.g. the unbind of q, k, v
                assert not costs.cuttable[k]


def test_too_many_stages_is_refused_with_the_maximum(gpt16):
    _, _, _, costs = gpt16
    most = sum(costs.cuttable) + 1
    assert len(partition(costs, most).cuts) == most - 1
    with pytest.raises(PartitionError, match=rf"S={most + 1} stages.*at most {most} stages"):
        partition(costs, most + 1)


def test_tiny_model_cannot_be_cut_into_many_stages():
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x).relu()

    costs = estimate_costs(capture(Tiny(), (torch.randn(2, 4),)))
    assert len(costs.nodes) == 2
    with pytest.raises(PartitionError, match=r"S=8 stages.*at most 2 stages"):
        partition(costs, bitpipe_placement(4))


# ---- synthetic cost tables: the search against brute force -----------------------------------------


def _table(weights, crossing=None, cuttable=None) -> CostTable:
    m = len(weights)
    nodes = tuple(NodeCost(f"n{i}", "op", w, 4, 4, (), True) for i, w in enumerate(weights))
    return CostTable(nodes, {}, {}, tuple(crossing or [0] * (m - 1)), tuple(cuttable or [True] * (m - 1)))


def _brute_force_peak(weights, placement: Placement) -> int:
    m, s = len(weights), placement.stages
    prefix = np.concatenate([[0], np.cumsum(weights)])
    best = None
    for cuts in itertools.combinations(range(1, m), s - 1):
        stage = np.diff(prefix[[0, *cuts, m]])
        peak = max(_device_loads(stage, placement))
        best = peak if best is None else min(best, peak)
    return int(best)


PLACEMENTS = {
    "1f1b-4": linear_placement(4),
    "interleaved-2x2": linear_placement(2, 2),
    "v-2": v_placement(2),
    "v-3": v_placement(3),
    "chimera-4": chimera_placement(4),
    "bitpipe-2": bitpipe_placement(2),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_small_graphs_get_the_optimal_partition(name):
    placement = PLACEMENTS[name]
    rng = random.Random(name)
    for _ in range(15):
        weights = [rng.randint(1, 100) for _ in range(rng.randint(placement.stages, 12))]
        part = partition(_table(weights), placement, balance_tolerance=0.0)
        assert max(part.device_loads) == _brute_force_peak(weights, placement)


def test_one_stage_per_device_is_optimal_on_large_graphs():
    rng = random.Random(7)
    weights = [rng.randint(1, 1000) for _ in range(400)]
    part = partition(_table(weights), 4, balance_tolerance=0.0)
    prefix = np.concatenate([[0], np.cumsum(weights)])
    # independent check: no 4-stage partition has a smaller largest stage (binary search on the answer)
    peak = max(part.stage_loads)

    def fits(cap: int) -> bool:
        stages, start = 1, 0
        for b in range(1, len(weights) + 1):
            if prefix[b] - prefix[start] > cap:
                stages, start = stages + 1, b - 1
                if prefix[b] - prefix[start] > cap:
                    return False
        return stages <= 4

    assert fits(peak) and not fits(peak - 1)


@pytest.mark.parametrize("name", ["v-2", "bitpipe-2", "chimera-4", "interleaved-2x2"])
def test_local_search_is_near_optimal_on_medium_graphs(name):
    placement = PLACEMENTS[name]
    rng = random.Random(name)
    for _ in range(3):
        weights = [rng.randint(1, 100) for _ in range(40)]  # C(39, 3) > the exhaustive limit
        part = partition(_table(weights), placement, balance_tolerance=0.0)
        assert max(part.device_loads) <= 1.05 * _brute_force_peak(weights, placement)


def test_bytes_decide_between_cuts_within_the_tolerance():
    weights = [10] * 8
    crossing = [10, 10, 10, 1000, 10, 10, 10]  # the perfectly balanced cut (after node 3) is expensive
    strict = partition(_table(weights, crossing), 2, balance_tolerance=0.0)
    assert strict.cuts == (4,) and strict.cut_bytes == (1000,)
    loose = partition(_table(weights, crossing), 2, balance_tolerance=0.3)
    assert loose.cuts == (3,) and loose.cut_bytes == (10,)
    assert max(loose.stage_loads) == 50


def test_uncuttable_boundaries_are_avoided():
    weights = [10] * 8
    cuttable = [True, True, True, False, True, True, True]
    part = partition(_table(weights, cuttable=cuttable), 2, balance_tolerance=0.0)
    assert part.cuts in ((3,), (5,))
