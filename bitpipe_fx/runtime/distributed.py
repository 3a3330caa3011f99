"""Distributed executor: one process per (data-parallel index, device); rank = dp_index * D + device.

At construction every rank (collectively, in the same order): checks the world size, broadcasts rank 0's
stage weights so replicas start identical, creates the per-stage gradient groups, then keeps private copies
of only its own stages. A step runs this device's action list with p2p messages and eager all-reduces, and
reduces the loss over the world so every rank returns the same value.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from bitpipe_fx.errors import PipelineRuntimeError
from bitpipe_fx.passes.stages import LossFn, SplitModel
from bitpipe_fx.runtime import rng
from bitpipe_fx.runtime.batch import MicroBatch
from bitpipe_fx.runtime.buffers import replay_over
from bitpipe_fx.runtime.chunk import StageReplica, build_device
from bitpipe_fx.runtime.gradsync import GradSync, replica_ranks
from bitpipe_fx.runtime.group import check_world
from bitpipe_fx.runtime.interpreter import DeviceInterpreter, forward_only
from bitpipe_fx.runtime.nonfinite import Finding, earliest
from bitpipe_fx.runtime.p2p import P2P
from bitpipe_fx.runtime.precision import FP32, Precision
from bitpipe_fx.runtime.predict import PredictInterpreter, share
from bitpipe_fx.runtime.specs import BoundarySpecs, TensorSpec
from bitpipe_fx.runtime.timeline import Recorder, merge
from bitpipe_fx.runtime.zero import ShardedSync
from bitpipe_fx.schedules.ir import Program
from bitpipe_fx.sim.trace import TraceEvent


def broadcast_stages(split: SplitModel) -> None:
    """Give every rank rank 0's parameters and buffers (one flat broadcast per stage and dtype)."""
    for stage in split.stages:
        tensors = list({id(t): t for t in [*stage.parameters(), *stage.buffers()]}.values())
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([t.detach().reshape(-1) for t in group])
                dist.broadcast(flat, src=0)
                offset = 0
                for t in group:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()


class DistributedExecutor:
    """Runs this rank's device program; holds only this device's stage replicas."""

    def __init__(
        self,
        program: Program,
        split: SplitModel,
        loss_fn: LossFn,
        specs: BoundarySpecs,
        data_parallel: int,
        timeout: float,
        lookahead: int = 4,
        seed: int = 0,
        shard_optimizer: bool = False,
        precision: Precision = FP32,
        recompute: tuple[bool, ...] = (),
    ) -> None:
        self.program, self.dp, self.timeout, self.seed = program, data_parallel, timeout, seed
        self.rank, self.world = check_world(program.devices, data_parallel)
        self.device, self.dp_index = self.rank % program.devices, self.rank // program.devices
        broadcast_stages(split)
        shared_specs = {
            fqn: TensorSpec.of(p)
            for fqn, stages in split.shared.items()
            for p in [dict(split.stages[stages[0]].named_parameters()).get(fqn)]
            if p is not None and p.requires_grad
        }
        place = program.placement
        pad_to = {s: len(replica_ranks(place, s, data_parallel)) for s in range(program.stages)}
        replicas, chunks = build_device(split, place, self.device, loss_fn, pad_to if shard_optimizer else None,
                                        precision, recompute)
        self.local_replicas = replicas
        sync = ShardedSync if shard_optimizer else GradSync
        self.gradsync = sync(place, data_parallel, replicas, split.shared, shared_specs, timeout)
        self.zero = self.gradsync if isinstance(self.gradsync, ShardedSync) else None  # sharded optimizer state
        device = next((p.device for r in replicas.values() for p in r.params.values()), torch.device("cpu"))
        self.tensor_device = device
        fwd = forward_only(program)
        self._p2p = {True: P2P(program, self.device, self.dp_index, specs, timeout, lookahead, device),
                     False: P2P(fwd, self.device, self.dp_index, specs, timeout, lookahead, device)}
        self._interp = {
            True: DeviceInterpreter(self.device, program, chunks, self._p2p[True], self.gradsync.start),
            False: DeviceInterpreter(self.device, fwd, chunks, self._p2p[False], self.gradsync.start),
        }
        self._predict = PredictInterpreter(self.device, fwd, chunks, self._p2p[False], self.gradsync.start)
        self.last_events: list[TraceEvent] = []
        self.last_nonfinite: Finding | None = None  # where the last training run first went non-finite

    @property
    def replicas(self) -> list[StageReplica]:
        return list(self.local_replicas.values())

    def _keys(self, step: int) -> rng.StepKeys:
        """This pipeline's micro-batch m is global micro-batch dp_index * N + m."""
        return rng.StepKeys(self.seed, step, self.dp_index * self.program.microbatches, self.tensor_device)

    def run(self, batch: list[MicroBatch], train: bool, record: bool, step: int) -> float:
        """One step (number ``step``, 0-based: it keys the random streams) over this rank's ``batch``; returns
        the mean loss over every micro-batch of every rank."""
        if record:
            self._wait(dist.barrier(async_op=True), "the barrier that starts a recorded step")
        recorder = Recorder(self.rank, record)
        interp, p2p = self._interp[train], self._p2p[train]
        for r in self.replicas:
            r.stats.begin()
        interp.begin(batch, 1.0 / (len(batch) * self.dp), train, recorder, self._keys(step))
        p2p.begin(recorder)
        self.gradsync.recorder = recorder
        while not interp.done:
            interp.run_next()
        p2p.finish()
        for stage, r in sorted(self.local_replicas.items()):
            if r.stats:
                replay_over(r.stats, len(batch) * self.dp, self.gradsync.groups.get(stage), self._wait)
        if train:
            self.gradsync.finish()
        found = interp.watch.findings(interp.losses, self.program.stages - 1, self._keys(step).first) if train else []
        totals = torch.tensor([interp.loss_sum(), len(found)], dtype=torch.float64, device=self.tensor_device)
        self._wait(dist.all_reduce(totals, async_op=True), "the loss all-reduce")
        loss = totals[0]
        self.last_nonfinite = self._agree(found) if totals[1] > 0 else None
        if record:
            gathered: list[list[TraceEvent] | None] = [None] * self.world
            dist.all_gather_object(gathered, recorder.events)
            self.last_events = merge(ev or [] for ev in gathered)
        return float(loss)

    def predict(self, batch: list[MicroBatch], step: int) -> dict[int, tuple[torch.Tensor, ...]]:
        """Forward-only pass over this pipeline's ``batch``; every micro-batch's flat outputs, on every rank of
        the pipeline (the last stage's ranks share theirs)."""
        recorder = Recorder(self.rank, False)
        self._predict.start(batch, recorder, self._keys(step))
        self._p2p[False].begin(recorder)
        while not self._predict.done:
            self._predict.run_next()
        self._p2p[False].finish()
        return share(self._predict.outputs, self.dp_index, self.world)

    def _agree(self, found: list[Finding]) -> Finding | None:
        """Every rank's findings, so that all pick the same earliest one (only when some rank found one)."""
        everyone: list[list[Finding] | None] = [None] * self.world
        dist.all_gather_object(everyone, found)
        return earliest(f for part in everyone for f in part or [])

    def _wait(self, work: dist.Work, what: str) -> None:
        start = time.perf_counter()
        try:
            work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise PipelineRuntimeError(
                f"rank {self.rank} (device {self.device}): {what} did not finish within {self.timeout}s "
                f"(waited {time.perf_counter() - start:.1f}s: {exc}); another rank died, stalled or raised "
                "(see its error)"
            ) from exc
