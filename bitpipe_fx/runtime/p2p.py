"""Point-to-point tensor bundles between the ranks of one pipeline, with shapes agreed at compile time.

Which messages exist, who sends them and in what order all come from ``schedules.comm`` (the same
derivation the simulator uses). A receiver posts its receives from each peer in that peer's send order
(what NCCL needs; gloo also matches by tag), a few ahead of use, and on demand up to the one it needs, so
a program that is valid cannot deadlock on a missing receive. Every wait is bounded and a failure names
the rank, the action, the message and the peer.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from bitpipe_fx.errors import PipelineRuntimeError
from bitpipe_fx.runtime.specs import BoundarySpecs, TensorSpec, check_message
from bitpipe_fx.runtime.timeline import Recorder
from bitpipe_fx.schedules.comm import Comm, Message, lower
from bitpipe_fx.schedules.ir import Action, Program


class P2P:
    """The messages of one device of one data-parallel pipeline, for one program."""

    def __init__(
        self,
        program: Program,
        device: int,
        dp_index: int,
        specs: BoundarySpecs,
        timeout: float,
        lookahead: int = 4,
        tensor_device: torch.device | None = None,
    ) -> None:
        self.device, self.specs, self.timeout, self.lookahead = device, specs, timeout, max(1, lookahead)
        self.base = dp_index * program.devices
        self.rank = self.base + device
        self.tensor_device = tensor_device or torch.device("cpu")
        sends = [[op.message for op in ops if isinstance(op, Comm) and op.op == "SEND"] for ops in lower(program)]
        self.tag = {m: i for i, m in enumerate(m for per_device in sends for m in per_device)}
        self.width = 1 + max(
            [len(self.layout(m)) for per_device in sends for m in per_device], default=0
        )  # tags per message
        self.incoming = {src: [m for m in sends[src] if m.dst == device] for src in range(program.devices)}
        self.incoming = {src: msgs for src, msgs in self.incoming.items() if msgs}

    def layout(self, message: Message) -> tuple[TensorSpec, ...]:
        """Tensors of ``message``: the stage's outputs (act) or its floating inputs (grad)."""
        return self.specs.act(message.stage) if message.kind == "act" else self.specs.grad(message.stage)

    def begin(self, recorder: Recorder) -> None:
        """Start a step: post the first receives from every peer."""
        self.recorder = recorder
        self.posted: dict[Message, tuple[list[torch.Tensor], list]] = {}
        self.next_post = dict.fromkeys(self.incoming, 0)
        self.sent: list[tuple[Message, list, list[torch.Tensor]]] = []
        for src in self.incoming:
            self._post(src, self.lookahead)

    def _post(self, src: int, count: int) -> None:
        queue = self.incoming[src]
        while count > 0 and self.next_post[src] < len(queue):
            msg = queue[self.next_post[src]]
            self.next_post[src] += 1
            count -= 1
            bufs = [torch.empty(t.shape, dtype=t.dtype, device=self.tensor_device) for t in self.layout(msg)]
            try:
                works = [
                    dist.irecv(b, src=self.base + src, tag=self.tag[msg] * self.width + j) for j, b in enumerate(bufs)
                ]
            except RuntimeError as exc:
                raise self._error(f"posted the receive of {msg}", None, self.base + src, exc) from exc
            self.posted[msg] = (bufs, works)

    def ready(self, message: Message) -> bool:
        """Always true: the distributed executor blocks (bounded) in ``recv`` instead of polling."""
        return True

    def recv(self, message: Message, action: Action) -> list[torch.Tensor]:
        """Wait (bounded) for ``message`` and return its tensors; posts further receives from that peer."""
        src = message.src
        if src not in self.incoming or message not in self.incoming[src]:
            raise PipelineRuntimeError(
                f"rank {self.rank}: {action} needs {message}, which rank {self.base + src} never sends"
            )
        while message not in self.posted:
            self._post(src, 1)
        bufs, works = self.posted.pop(message)
        start = time.perf_counter()
        for w in works:
            try:
                w.wait(timedelta(seconds=self.timeout))
            except RuntimeError as exc:
                raise self._error(
                    f"waited for the {message.kind} of pipe {message.pipe} stage {message.stage} micro-batch "
                    f"{message.microbatch}", action, self.base + src, exc
                ) from exc
        self.recorder.event(str(message), "RECV", message.pipe, message.stage, message.microbatch,
                            start, time.perf_counter())
        self._post(src, 1)
        return bufs

    def send(self, message: Message, tensors: list[torch.Tensor], action: Action) -> None:
        """Check the bundle against the agreed layout, then isend each tensor (kept alive until its send has
        completed: bundles already delivered are released first, so a step does not hold all it sent)."""
        check_message(f"rank {self.rank}: message {message} from {action}", tensors, self.layout(message))
        self._release()
        peer = self.base + message.dst
        tensors = [t.contiguous() for t in tensors]
        try:
            works = [
                dist.isend(t, dst=peer, tag=self.tag[message] * self.width + j) for j, t in enumerate(tensors)
            ]
        except RuntimeError as exc:
            raise self._error(f"sent {message}", action, peer, exc) from exc
        self.sent.append((message, works, tensors))

    def _release(self) -> None:
        """Drop the sent bundles whose sends have all completed (waiting on them raises a failed one)."""
        done = [entry for entry in self.sent if all(w.is_completed() for w in entry[1])]
        for entry in done:
            self._delivered(entry)
        self.sent = [entry for entry in self.sent if not any(entry is d for d in done)]

    def _delivered(self, entry: tuple[Message, list, list[torch.Tensor]]) -> None:
        """Wait (bounded) until every tensor of one sent bundle has gone."""
        message, works, _ = entry
        for w in works:
            try:
                w.wait(timedelta(seconds=self.timeout))
            except RuntimeError as exc:
                raise self._error(f"waited for the delivery of {message}", None, self.base + message.dst, exc) from exc

    def finish(self) -> None:
        """Wait (bounded) until every send of the step has completed; refuse leftover receives."""
        for entry in self.sent:
            self._delivered(entry)
        self.sent = []
        left = [m for m in self.posted] + [
            m for src, q in self.incoming.items() for m in q[self.next_post[src]:]
        ]
        if left:
            raise PipelineRuntimeError(
                f"rank {self.rank}: step ended with {len(left)} message(s) never consumed, e.g. {left[0]}; "
                "the program and the executor disagree"
            )

    def _error(self, what: str, action: Action | None, peer: int, exc: BaseException | None) -> PipelineRuntimeError:
        during = f" running {action}" if action is not None else " finishing the step"
        cause = f": {exc}" if exc is not None else ""
        return PipelineRuntimeError(
            f"rank {self.rank} (device {self.device}),{during}, {what} (peer rank {peer}) and got no answer "
            f"within {self.timeout}s or lost the connection{cause}. Rank {peer} probably died, stalled or raised "
            "(see its error); pass a larger timeout= to compile() if steps are legitimately this slow"
        )
