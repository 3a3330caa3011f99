"""Local executor: every device of the program in one process, replicas as separate module copies.

Devices take turns; a device runs actions while their inputs are in the mailbox (cross-device messages) or
its hand-off table (V turns). Gradient sync happens in-process at the end of the step, with the same sums
the distributed executor's all-reduces compute, so both give the same numbers.
"""

from __future__ import annotations

import time

import torch

from bitpipe_fx.errors import ConfigError, PipelineRuntimeError
from bitpipe_fx.passes.stages import LossFn, SplitModel
from bitpipe_fx.runtime import rng
from bitpipe_fx.runtime.batch import MicroBatch
from bitpipe_fx.runtime.buffers import replay_in_process
from bitpipe_fx.runtime.chunk import StageReplica, build_device
from bitpipe_fx.runtime.interpreter import DeviceInterpreter, forward_only
from bitpipe_fx.runtime.nonfinite import Finding, earliest
from bitpipe_fx.runtime.precision import FP32, Precision
from bitpipe_fx.runtime.predict import PredictInterpreter
from bitpipe_fx.runtime.specs import BoundarySpecs, check_message
from bitpipe_fx.runtime.timeline import Recorder, merge
from bitpipe_fx.schedules.comm import Message
from bitpipe_fx.schedules.ir import Action, Program
from bitpipe_fx.sim.trace import TraceEvent


class Mailbox:
    """In-process transport: messages wait in a dict until their consumer takes them."""

    def __init__(self, specs: BoundarySpecs) -> None:
        self.specs = specs
        self.box: dict[Message, list[torch.Tensor]] = {}

    def send(self, message: Message, tensors: list[torch.Tensor], action: Action) -> None:
        want = self.specs.act(message.stage) if message.kind == "act" else self.specs.grad(message.stage)
        check_message(f"message {message} sent by {action}", tensors, want)
        self.box[message] = tensors

    def ready(self, message: Message) -> bool:
        return message in self.box

    def recv(self, message: Message, action: Action) -> list[torch.Tensor]:
        if message not in self.box:
            raise PipelineRuntimeError(f"{action} needs message {message}, which was never sent")
        return self.box.pop(message)


class LocalExecutor:
    """Runs a program's devices in one process; holds every (device, stage) replica."""

    def __init__(
        self,
        program: Program,
        split: SplitModel,
        loss_fn: LossFn,
        specs: BoundarySpecs,
        data_parallel: int = 1,
        seed: int = 0,
        precision: Precision = FP32,
        recompute: tuple[bool, ...] = (),
    ) -> None:
        if data_parallel != 1:
            raise ConfigError(
                f"data_parallel={data_parallel} needs one process per (device, replica): initialise "
                f"torch.distributed with world size devices x data_parallel = {program.devices * data_parallel} "
                "(torchrun, or bitpipe_fx.runtime.launch); the local executor runs data_parallel=1 only"
            )
        self.program, self.split, self.seed = program, split, seed
        self.mailbox = Mailbox(specs)
        self.device_replicas: list[dict[int, StageReplica]] = []
        self._train: list[DeviceInterpreter] = []
        self._eval: list[DeviceInterpreter] = []
        self._predict: list[PredictInterpreter] = []
        fwd = forward_only(program)
        for d in range(program.devices):
            replicas, chunks = build_device(split, program.placement, d, loss_fn, precision=precision,
                                            recompute=recompute)
            self.device_replicas.append(replicas)
            self._train.append(DeviceInterpreter(d, program, chunks, self.mailbox, lambda r: None))
            self._eval.append(DeviceInterpreter(d, fwd, chunks, self.mailbox, lambda r: None))
            self._predict.append(PredictInterpreter(d, fwd, chunks, self.mailbox, lambda r: None))
        self.last_events: list[TraceEvent] = []
        self.last_nonfinite: Finding | None = None  # where the last training run first went non-finite

    @property
    def replicas(self) -> list[StageReplica]:
        """Every replica this process holds (all devices)."""
        return [r for reps in self.device_replicas for r in reps.values()]

    def run(self, batch: list[MicroBatch], train: bool, record: bool, step: int) -> float:
        """One step (number ``step``, 0-based: it keys the random streams) over ``batch``; returns the mean loss.
        With ``train`` the summed gradients are left."""
        interps = self._train if train else self._eval
        t0 = time.perf_counter()
        recorders = [Recorder(d, record, t0) for d in range(self.program.devices)]
        scale = 1.0 / len(batch)
        for r in self.replicas:
            r.stats.begin()
        for it, rec in zip(interps, recorders):
            it.begin(batch, scale, train, rec, self._keys(step))
        self._drive(interps)
        for stage in range(self.program.stages):
            devices = self.program.placement.replica_devices(stage)
            replay_in_process([self.device_replicas[d][stage].stats for d in devices], len(batch))
        if train:
            start = time.perf_counter()
            self._sum_replicas()
            self._sum_shared()
            for rec in recorders:
                rec.event("grad sum", "SYNC", -1, -1, -1, start, time.perf_counter())
        self.last_events = merge(rec.events for rec in recorders)
        last = self.program.stages - 1
        found = [f for it in interps for f in it.watch.findings(it.losses, last, 0)] if train else []
        self.last_nonfinite = earliest(found)
        return sum(it.loss_sum() for it in interps)

    def _keys(self, step: int) -> rng.StepKeys:
        device = next((r.device for r in self.replicas), rng.CPU)
        return rng.StepKeys(self.seed, step, 0, device)

    def predict(self, batch: list[MicroBatch], step: int) -> dict[int, tuple[torch.Tensor, ...]]:
        """Forward-only pass over ``batch``; the last stage's flat outputs by micro-batch."""
        for d, it in enumerate(self._predict):
            it.start(batch, Recorder(d, False), self._keys(step))
        self._drive(self._predict)
        return {m: out for it in self._predict for m, out in it.outputs.items()}

    def _drive(self, interps: list[DeviceInterpreter]) -> None:
        """Let the devices take turns until every action ran (or nothing can run: a deadlock)."""
        self.mailbox.box.clear()
        while not all(it.done for it in interps):
            progressed = False
            for it in interps:
                while not it.done and it.ready():
                    it.run_next()
                    progressed = True
            if not progressed:
                blocked = ", ".join(f"device {it.device} at {it.next_action}" for it in interps if not it.done)
                raise PipelineRuntimeError(f"program {self.program.name!r} deadlocked: {blocked}")

    def _sum_replicas(self) -> None:
        """Every replica of a stage gets the sum of all replicas' gradients (the replica all-reduce)."""
        for stage in range(self.program.stages):
            reps = [self.device_replicas[d][stage] for d in self.program.placement.replica_devices(stage)]
            if len(reps) < 2:
                continue
            for i in range(len(reps[0].flat_grads)):
                total = torch.stack([r.flat_grads[i] for r in reps]).sum(0)
                for r in reps:
                    r.flat_grads[i].copy_(total)

    def _sum_shared(self) -> None:
        """Every copy of a tied parameter gets the sum over the stages using it."""
        place = self.program.placement
        for fqn, stages in self.split.shared.items():
            copies = [[self.device_replicas[d][s].params[fqn] for d in place.replica_devices(s)] for s in stages]
            if not copies[0][0].requires_grad:
                continue
            total = torch.stack([per_stage[0].grad for per_stage in copies]).sum(0)
            for per_stage in copies:
                for p in per_stage:
                    p.grad.copy_(total)
