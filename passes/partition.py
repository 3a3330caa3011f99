"""partition: choose S-1 cut points in topological order that balance the devices of a placement.

A device's load is the sum, over the (pipe, stage) chunks the placement gives it, of the stage's cost times
the micro-batches that pipe carries (a bitpipe device holds four chunks, a V-shape device two, a 1F1B device
one). The search minimises the slowest device's load, then the spread of loads (sum of squares), starting
from cuts at equal shares of the total and moving one cut at a time to its best position (coordinate
descent; every move strictly improves, so it terminates). A second pass then minimises the bytes crossing
the cuts while keeping the slowest device within ``balance_tolerance`` of the optimum found. Integer
arithmetic throughout, and ties broken by position, so every rank computes the same cuts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bitpipe_fx.errors import ConfigError, PartitionError
from bitpipe_fx.passes.cost import CostTable
from bitpipe_fx.schedules.ir import Placement, linear_placement

_MAX_SWEEPS = 200


@dataclass(frozen=True)
class Partition:
    """Stage k = compute nodes [cuts[k-1], cuts[k]) (with cuts[-1] = 0 and cuts[S-1] = number of nodes)."""

    cuts: tuple[int, ...]
    stage_loads: tuple[int, ...]  # cost of each stage (FLOPs, or the weights given)
    device_loads: tuple[int, ...]  # per device: sum of its chunks' costs times micro-batches of their pipe
    cut_bytes: tuple[int, ...]  # bytes crossing each cut

    @property
    def stages(self) -> int:
        return len(self.cuts) + 1

    @property
    def balance(self) -> float:
        """max/mean device load (1.0 = perfect)."""
        mean = sum(self.device_loads) / len(self.device_loads)
        return max(self.device_loads) / mean if mean else 1.0


def partition(
    costs: CostTable,
    placement: Placement | int,
    *,
    pipe_microbatches: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
    balance_tolerance: float = 0.02,
) -> Partition:
    """Cut ``costs``' nodes into ``placement.stages`` stages (an int S means S devices, one stage each).

    ``pipe_microbatches``: micro-batches per pipe (default equal); ``weights``: per-node cost to balance
    instead of FLOPs (e.g. measured times).
    """
    if isinstance(placement, int):
        if placement < 1:
            raise ConfigError(f"number of stages must be >= 1, got {placement}")
        placement = linear_placement(placement)
    num_stages, m = placement.stages, len(costs.nodes)
    per_pipe = tuple(pipe_microbatches) if pipe_microbatches is not None else (1,) * placement.pipes
    if len(per_pipe) != placement.pipes:
        raise ConfigError(f"pipe_microbatches has {len(per_pipe)} entries for {placement.pipes} pipes")
    w = _integer_weights(costs.flops if weights is None else weights, m)
    valid = np.array([b for b in range(1, m) if costs.cuttable[b - 1]], dtype=np.int64)
    if len(valid) < num_stages - 1:
        raise PartitionError(
            f"cannot cut the graph into S={num_stages} stages: it has {m} nodes and {len(valid)} places where a "
            f"cut is allowed, so at most {len(valid) + 1} stages; use fewer devices or chunks per device "
            f"(S={num_stages} comes from the schedule's placement)"
        )
    coef = np.zeros((placement.devices, num_stages), dtype=np.int64)
    for p, row in enumerate(placement.table):
        for s, d in enumerate(row):
            coef[d, s] += per_pipe[p]
    prefix = np.concatenate([[0], np.cumsum(w)])
    crossing = np.array((0, *costs.crossing_bytes), dtype=np.int64)  # crossing[b] for boundary b
    search = _Search(prefix, coef, crossing, valid)
    cuts = search.bottleneck_cuts(num_stages)
    cuts = search.descend(cuts)
    peak, largest = search.peaks(cuts)
    cuts = search.descend(cuts, limits=(int(peak * (1 + balance_tolerance)), int(largest * (1 + balance_tolerance))))
    bounds = np.array((0, *cuts, m))
    stage_loads = np.diff(prefix[bounds])
    return Partition(
        cuts=tuple(int(c) for c in cuts),
        stage_loads=tuple(int(x) for x in stage_loads),
        device_loads=tuple(int(x) for x in coef @ stage_loads),
        cut_bytes=tuple(int(crossing[c]) for c in cuts),
    )


def _integer_weights(values: Sequence[float], m: int) -> np.ndarray:
    """Exact integer node weights (floats are rescaled so that the total is about 1e12)."""
    if len(values) != m:
        raise ConfigError(f"weights has {len(values)} entries for a graph of {m} nodes")
    arr = np.asarray(values, dtype=np.float64)
    if (arr < 0).any() or not np.isfinite(arr).all():
        raise ConfigError("node weights must be finite and non-negative")
    if np.all(arr == np.round(arr)) and arr.sum() < 2**52:
        return arr.astype(np.int64)
    return np.rint(arr / max(arr.sum(), 1e-300) * 1e12).astype(np.int64)


class _Search:
    """Cut search over prefix sums of integer node weights; ``valid`` holds the allowed boundaries."""

    def __init__(self, prefix: np.ndarray, coef: np.ndarray, crossing: np.ndarray, valid: np.ndarray) -> None:
        self.prefix, self.coef, self.crossing, self.valid = prefix, coef, crossing, valid
        self.m = len(prefix) - 1

    def stage_loads(self, cuts: np.ndarray) -> np.ndarray:
        return np.diff(self.prefix[np.concatenate([[0], cuts, [self.m]])])

    def peaks(self, cuts: np.ndarray) -> tuple[int, int]:
        """(slowest device's load, largest stage's load)."""
        stage = self.stage_loads(cuts)
        return int((self.coef @ stage).max()), int(stage.max())

    def _greedy(self, cap: int, num_stages: int) -> np.ndarray | None:
        """Leftmost-packed cuts with every stage <= cap, or None when S stages cannot hold the graph."""
        cuts: list[int] = []
        start = 0
        while self.prefix[-1] - self.prefix[start] > cap:
            reach = np.searchsorted(self.valid, start, side="right")
            stop = np.searchsorted(self.prefix[self.valid], self.prefix[start] + cap, side="right")
            if stop <= reach or len(cuts) == num_stages - 1:
                return None
            start = int(self.valid[stop - 1])
            cuts.append(start)
        spare = [b for b in self.valid if b not in set(cuts)]  # split further: smaller stages never hurt
        while len(cuts) < num_stages - 1:
            cuts.append(int(spare.pop()))
        return np.array(sorted(cuts), dtype=np.int64)

    def bottleneck_cuts(self, num_stages: int) -> np.ndarray:
        """Cuts minimising the largest stage exactly (binary search on the cap, greedy feasibility)."""
        lo, hi = -(-int(self.prefix[-1]) // num_stages), int(self.prefix[-1])
        while lo < hi:
            mid = (lo + hi) // 2
            if self._greedy(mid, num_stages) is None:
                lo = mid + 1
            else:
                hi = mid
        cuts = self._greedy(lo, num_stages)
        assert cuts is not None
        return cuts

    def descend(self, cuts: np.ndarray, limits: tuple[int, int] | None = None) -> np.ndarray:
        """Move one cut at a time to its best valid position until no move improves the key.

        Without limits the key is (slowest device's load, sum of squared stage loads); with limits
        (device, stage) it is (total bytes crossing the cuts, slowest device, sum of squares) among positions
        that keep the slowest device and the largest stage within the limits.
        """
        cuts = cuts.copy()
        for _ in range(_MAX_SWEEPS):
            moved = False
            for i in range(len(cuts)):
                best = self._best_position(cuts, i, limits)
                if best != cuts[i]:
                    cuts[i] = best
                    moved = True
            if not moved:
                break
        return cuts

    def _best_position(self, cuts: np.ndarray, i: int, limits: tuple[int, int] | None) -> int:
        left = cuts[i - 1] if i > 0 else 0
        right = cuts[i + 1] if i + 1 < len(cuts) else self.m
        cand = self.valid[(self.valid > left) & (self.valid < right)]
        stage = self.stage_loads(cuts)
        # only stages i (ends at cut i) and i+1 (starts at cut i) change with the candidate position
        before = self.prefix[cand] - self.prefix[left]
        after = self.prefix[right] - self.prefix[cand]
        rest = self.coef @ stage - self.coef[:, i] * stage[i] - self.coef[:, i + 1] * stage[i + 1]
        loads = rest[:, None] + self.coef[:, i : i + 1] * before[None, :] + self.coef[:, i + 1 : i + 2] * after[None]
        peak = loads.max(axis=0)
        others = float((stage.astype(np.float64) ** 2).sum() - float(stage[i]) ** 2 - float(stage[i + 1]) ** 2)
        spread = others + before.astype(np.float64) ** 2 + after.astype(np.float64) ** 2
        current = int(np.searchsorted(cand, cuts[i]))
        if limits is None:
            traffic = np.zeros(len(cand), dtype=np.int64)
            allowed = np.ones(len(cand), dtype=bool)
        else:
            traffic = self.crossing[cand]
            allowed = (peak <= limits[0]) & (np.maximum(before, after) <= max(limits[1], int(stage.max())))
        allowed[current] = True
        order = np.lexsort((cand, spread, peak, traffic))
        best = int(next(j for j in order if allowed[j]))
        key_best, key_now = (traffic[best], peak[best]), (traffic[current], peak[current])
        better = key_best < key_now or (key_best == key_now and spread[best] < spread[current] * (1.0 - 1e-12))
        return int(cand[best]) if better else int(cuts[i])
