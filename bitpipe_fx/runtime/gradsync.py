"""Eager gradient sync over torch.distributed: one async all-reduce per stage replica's flat buffer.

Stage s's gradients are summed over its replica devices x the data-parallel ranks (one process group per
stage, created identically on every rank at compile time, so collectives of different stages never need
a common order). Tied parameters then get the sum over every stage that uses them, in one small extra
all-reduce over the world: each stage contributes once (from its lowest replica rank of data-parallel
index 0, since every replica already holds the replica sum).
"""

from __future__ import annotations

import math
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from bitpipe_fx.errors import PipelineRuntimeError
from bitpipe_fx.runtime.chunk import StageReplica
from bitpipe_fx.runtime.specs import TensorSpec
from bitpipe_fx.runtime.timeline import Recorder
from bitpipe_fx.schedules.ir import Placement

_GROUPS: dict[tuple[tuple[int, ...], int], object] = {}
_GROUPS_WORLD: list[object] = []  # the world the cached groups belong to (held, so it is never mistaken)


def replica_ranks(placement: Placement, stage: int, data_parallel: int) -> tuple[int, ...]:
    """Ranks holding a copy of ``stage``: its replica devices in every data-parallel pipeline."""
    D = placement.devices
    return tuple(sorted(dp * D + d for dp in range(data_parallel) for d in placement.replica_devices(stage)))


def stage_groups(placement: Placement, data_parallel: int, timeout: float) -> dict[int, object]:
    """One process group per stage with more than one copy; every rank must call this identically.

    Groups are cached per (world, ranks, ordinal) and reused by later compiles with the same layout.
    """
    if not _GROUPS_WORLD or _GROUPS_WORLD[0] is not dist.group.WORLD:
        _GROUPS.clear()
        _GROUPS_WORLD[:] = [dist.group.WORLD]
    seen: dict[tuple[int, ...], int] = {}
    groups = {}
    for stage in range(placement.stages):
        ranks = replica_ranks(placement, stage, data_parallel)
        if len(ranks) < 2:
            continue
        ordinal = seen[ranks] = seen.get(ranks, -1) + 1
        key = (ranks, ordinal)
        if key not in _GROUPS:
            _GROUPS[key] = dist.new_group(list(ranks), timeout=timedelta(seconds=timeout))
        groups[stage] = _GROUPS[key]
    return groups


class GradSync:
    """Starts each local replica's all-reduce at its SYNC; ``finish`` waits (bounded) and sums tied params."""

    def __init__(
        self,
        placement: Placement,
        data_parallel: int,
        replicas: dict[int, StageReplica],
        shared: dict[str, tuple[int, ...]],
        shared_specs: dict[str, TensorSpec],
        timeout: float,
    ) -> None:
        self.placement, self.dp, self.replicas, self.timeout = placement, data_parallel, replicas, timeout
        self.rank = dist.get_rank()
        self.groups = stage_groups(placement, data_parallel, timeout)
        self.shared = {fqn: stages for fqn, stages in shared.items() if fqn in shared_specs}
        self.shared_specs = shared_specs
        params = [p for r in replicas.values() for p in r.params.values()]
        self.device = params[0].device if params else torch.device("cpu")
        self._pending: list[tuple[int, object, float]] = []
        self.recorder: Recorder | None = None

    def start(self, replica: StageReplica) -> None:
        """Launch the async all-reduce of ``replica``'s flat buffers (no-op when it has no other copy)."""
        group = self.groups.get(replica.stage)
        if group is None:
            return
        t = time.perf_counter()
        for flat in replica.flat_grads:
            work = dist.all_reduce(flat, group=group, async_op=True)
            self._pending.append((replica.stage, work, t))

    def finish(self) -> None:
        """Wait for every launched all-reduce, then give tied parameters the sum over their stages."""
        self.wait_pending("gradient all-reduce", "allreduce")
        if self.shared:
            self._sum_shared()

    def wait_pending(self, what: str, label: str) -> None:
        """Wait (bounded by the timeout) for every launched collective; a late one names its stage and peers."""
        pending, self._pending = self._pending, []
        for stage, work, started in pending:
            try:
                work.wait(timedelta(seconds=self.timeout))
            except RuntimeError as exc:
                peers = [r for r in replica_ranks(self.placement, stage, self.dp) if r != self.rank]
                raise PipelineRuntimeError(
                    f"rank {self.rank}: {what} of stage {stage} with ranks {peers} did not finish "
                    f"within {self.timeout}s ({exc}); a peer died, stalled or failed earlier (see its error)"
                ) from exc
            if self.recorder is not None:
                self.recorder.event(f"{label} stage {stage}", "SYNC", -1, stage, -1, started, time.perf_counter())

    def _sum_shared(self) -> None:
        place = self.placement
        device = self.rank % place.devices
        contribute = self.rank < place.devices  # data-parallel index 0: every dp copy holds the same sums
        by_dtype: dict[torch.dtype, list[str]] = {}
        for fqn in sorted(self.shared):
            by_dtype.setdefault(self.shared_specs[fqn].dtype, []).append(fqn)
        for dtype, names in by_dtype.items():
            parts = []
            for fqn in names:
                owned = [
                    self.replicas[s].params[fqn].grad
                    for s in self.shared[fqn]
                    if contribute and s in self.replicas and place.replica_devices(s)[0] == device
                ]
                numel = math.prod(self.shared_specs[fqn].shape)
                parts.append(
                    torch.stack(owned).sum(0).reshape(-1) if owned
                    else torch.zeros(numel, dtype=dtype, device=self.device)
                )
            flat = torch.cat(parts)
            try:
                dist.all_reduce(flat, async_op=True).wait(timedelta(seconds=self.timeout))
            except RuntimeError as exc:
                raise PipelineRuntimeError(
                    f"rank {self.rank}: all-reduce of tied parameters {names} did not finish within "
                    f"{self.timeout}s ({exc}); a peer died, stalled or failed earlier (see its error)"
                ) from exc
            offset = 0
            for fqn in names:
                n = math.prod(self.shared_specs[fqn].shape)
                for r in self.replicas.values():
                    grad = r.params[fqn].grad if fqn in r.params else None
                    if grad is not None:
                        grad.copy_(flat[offset : offset + n].view_as(grad))
                offset += n
