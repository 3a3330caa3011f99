"""The one interpreter of a device's action list, shared by the local and the distributed executor.

Cross-device values go through a ``Transport`` and only where ``schedules.comm`` derives a message; values
whose producer and consumer chunk sit on the same device (V turns) are handed over directly. Every forward
runs under the randomness rule (runtime.rng): its activation bundle ends with the generator state it left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from bitpipe_fx.errors import PipelineRuntimeError
from bitpipe_fx.runtime import rng
from bitpipe_fx.runtime.batch import MicroBatch
from bitpipe_fx.runtime.chunk import Chunk, StageReplica
from bitpipe_fx.runtime.nonfinite import Watch
from bitpipe_fx.runtime.timeline import Recorder
from bitpipe_fx.schedules.comm import Message, consumed_value, produced_value
from bitpipe_fx.schedules.ir import Action, Program


class Transport(Protocol):
    """Moves cross-device messages; ``ready`` says whether ``recv`` would return without waiting."""

    def send(self, message: Message, tensors: list[torch.Tensor], action: Action) -> None: ...

    def ready(self, message: Message) -> bool: ...

    def recv(self, message: Message, action: Action) -> list[torch.Tensor]: ...


def forward_only(program: Program) -> Program:
    """The program's forwards in the same per-device order (evaluation): still deadlock-free."""
    acts = tuple(tuple(a for a in row if a.kind == "F") for row in program.device_actions)
    return Program(f"{program.name}-forward", program.placement, program.pipe_of, acts)


class DeviceInterpreter:
    """Runs one device's actions, one at a time, for one step."""

    def __init__(
        self,
        device: int,
        program: Program,
        chunks: Mapping[tuple[int, int], Chunk],
        transport: Transport,
        on_sync: Callable[[StageReplica], None],
    ) -> None:
        self.device, self.program, self.chunks = device, program, chunks
        self.transport, self.on_sync = transport, on_sync
        self.actions = program.actions(device)
        # per position, derived once per program: what the action consumes and produces
        self._consumed = [consumed_value(program, a) for a in self.actions]
        self._produced = [produced_value(program, a) for a in self.actions]
        self._chunks_per_replica: dict[int, int] = {}
        for c in chunks.values():
            self._chunks_per_replica[id(c.replica)] = self._chunks_per_replica.get(id(c.replica), 0) + 1
        self.pos = 0
        self.watch = Watch()

    def begin(self, batch: list[MicroBatch], scale: float, train: bool, recorder: Recorder,
              keys: rng.StepKeys) -> None:
        """Reset for a step over ``batch``; the last stage's loss is multiplied by ``scale``; ``keys``: where each
        micro-batch's random stream starts."""
        self.batch, self.scale, self.train, self.recorder, self.keys = batch, scale, train, recorder, keys
        self.pos = 0
        self.handoff: dict[Message, list[torch.Tensor]] = {}
        self.losses: dict[int, torch.Tensor] = {}  # scaled loss by micro-batch (last stage)
        self.watch.begin()
        self._synced: dict[int, int] = {}

    def loss_sum(self) -> float:
        """Sum of this device's scaled micro-batch losses (summed in float64)."""
        return float(sum(loss.to(torch.float64) for loss in self.losses.values())) if self.losses else 0.0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.actions)

    @property
    def next_action(self) -> Action:
        return self.actions[self.pos]

    def ready(self) -> bool:
        """Whether the next action's inputs are here (local hand-off done, or message arrived)."""
        value = self._consumed[self.pos]
        if value is None:
            return True
        return value in self.handoff if value.src == value.dst else self.transport.ready(value)

    def run_next(self) -> None:
        """Execute the next action (blocking on its message in the distributed executor)."""
        i = self.pos
        a = self.actions[i]
        self.pos += 1
        if a.kind == "SYNC":
            self._sync(a)
            return
        chunk = self.chunks.get(a.chunk)
        if chunk is None:
            raise PipelineRuntimeError(f"device {self.device} runs {a} but does not hold chunk {a.chunk}")
        received = self._receive(a, self._consumed[i])
        start = time.perf_counter()
        produced = self._forward(chunk, a, received) if a.kind == "F" else self._compute(chunk, a, received)
        self.recorder.action(a, start, time.perf_counter())
        if a.kind in ("B", "W") and self.train:
            self.watch.after_backward(chunk.replica, self.keys.first + a.microbatch)
        if produced is not None:
            self._produce(a, self._produced[i], produced)

    def _receive(self, a: Action, value: Message | None) -> list[torch.Tensor] | None:
        if value is None:
            return None
        if value.src != value.dst:
            return self.transport.recv(value, a)
        if value not in self.handoff:
            raise PipelineRuntimeError(
                f"device {self.device} runs {a} before its local input {value} exists; the program orders a "
                "chunk's consumer before its producer on the same device"
            )
        return self.handoff.pop(value)

    def _forward(self, chunk: Chunk, a: Action, received: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        """F under the randomness rule: stage 0 starts from the micro-batch's key state, later stages from the
        state that came with the activation; the state left is sent on after the outputs. Batch-norm running
        statistics are recorded per global micro-batch (runtime.buffers)."""
        if chunk.stage == 0:
            acts, state = received or [], self.keys.state(a.microbatch)
        else:
            *acts, state = received or []
        stats = chunk.replica.stats if chunk.replica.module.training else None
        if stats:
            stats.before_forward()
        with rng.stream(state, chunk.replica.device) as stream:
            out = self._compute(chunk, a, acts)
        if stats:
            stats.after_forward(self.keys.first + a.microbatch)
        chunk.started_from(a.microbatch, state)
        return None if out is None else [*out, stream.after]

    def _compute(self, chunk: Chunk, a: Action, received: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        if a.kind == "F":
            mb = self.batch[a.microbatch]
            model_inputs = [mb.inputs[n] for n in chunk.spec.model_inputs]
            out = chunk.forward(a.microbatch, model_inputs, received or [], mb.target, self.scale, self.train)
            if chunk.last:
                self.losses[a.microbatch] = out.detach()
                return None
            return list(out)
        if a.kind == "B":
            return chunk.backward(a.microbatch, received)
        if a.kind == "I":
            return chunk.backward_input(a.microbatch, received)
        chunk.backward_weight(a.microbatch)
        return None

    def _produce(self, a: Action, value: Message | None, tensors: list[torch.Tensor]) -> None:
        if value is None:
            return
        if value.src != value.dst:
            self.transport.send(value, tensors, a)
        else:
            self.handoff[value] = tensors

    def _sync(self, a: Action) -> None:
        chunk = self.chunks[a.chunk]
        rid = id(chunk.replica)
        self._synced[rid] = self._synced.get(rid, 0) + 1
        if self._synced[rid] == self._chunks_per_replica[rid]:
            self.on_sync(chunk.replica)
