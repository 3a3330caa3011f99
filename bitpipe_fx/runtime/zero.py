"""Sharded optimizer state (ZeRO-1) over each stage's copy group: reduce-scatter, shard update, all-gather.

Every copy of stage s (its replica devices x the data-parallel ranks, ``gradsync.replica_ranks``) keeps its
trainable parameters and gradients in flat buffers padded to a multiple of the group size g
(``chunk.StageReplica(pad_to=g)``), so position i of the group owns the same contiguous range
[i*c, (i+1)*c), c = padded / g, of every copy's buffer. At SYNC the gradient buffer is reduce-scattered into
that shard (eagerly, as the all-reduce is without sharding); tied parameters then get the sum of every
copy's local gradient over the world, written into each shard holding a piece of them, so they stay exact.
The optimizer is built over the pieces (one 1-D parameter per original parameter and shard, a view of the
flat parameter buffer) and holds state for them only; after its step, and after Schedule-Free's
train()/eval() swap, the shards are all-gathered so every copy holds the full parameters. A stage with one
copy is a group of one: its shard is the whole buffer and nothing is sent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property

import torch
import torch.distributed as dist
from torch import nn

from bitpipe_fx.errors import PipelineRuntimeError
from bitpipe_fx.runtime.chunk import StageReplica
from bitpipe_fx.runtime.gradsync import GradSync, replica_ranks
from bitpipe_fx.runtime.state import OptimizerState, Piece


@dataclass(eq=False)
class Held:
    """One piece as the optimizer holds it: the parameter (a view of the flat parameters), where it starts in
    the shard, and its gradient (a view of the shard's summed gradient)."""

    piece: Piece
    param: nn.Parameter
    at: int
    grad: torch.Tensor

    def attach(self) -> None:
        """Re-attach the gradient view if something replaced it (zero_grad(set_to_none=True))."""
        if self.param.grad is not self.grad:
            self.param.grad = self.grad


@dataclass
class Shard:
    """This rank's shard of one flat buffer of one local replica: its summed gradient and its pieces."""

    replica: StageReplica
    index: int  # which flat buffer of the replica (one per dtype and device)
    position: int  # this rank's position in the stage's copy group
    size: int  # the group size g
    group: object | None  # the stage's process group (None for a group of one)
    grad: torch.Tensor  # the shard's summed gradient (for a group of one, the flat buffer itself)
    pieces: list[Held]  # what the optimizer updates: views of the flat parameters
    offsets: dict[str, tuple[int, nn.Parameter]]  # FQN -> (offset in the flat buffer, the replica's parameter)

    @property
    def flat(self) -> torch.Tensor:
        return self.replica.flat_params[self.index]

    @property
    def low(self) -> int:
        return self.position * self.grad.numel()

    def values(self) -> torch.Tensor:
        """The shard's range of the flat parameter buffer (a view)."""
        return self.flat[self.low : self.low + self.grad.numel()]


def shards_of(replica: StageReplica, ranks: tuple[int, ...], rank: int, group: object | None) -> list[Shard]:
    """This rank's shards of ``replica``'s flat buffers, copied by ``ranks``; pieces get views of the shard grad."""
    size, position = len(ranks), ranks.index(rank)
    out = []
    for index, (flat, entries) in enumerate(zip(replica.flat_params, replica.layout)):
        chunk = flat.numel() // size
        low, high = position * chunk, (position + 1) * chunk
        grad = replica.flat_grads[index] if size == 1 else torch.zeros(chunk, dtype=flat.dtype, device=flat.device)
        pieces = []
        for fqn, offset, p in entries:
            start, stop = max(low, offset), min(high, offset + p.numel())
            if start < stop:
                held = Held(Piece(fqn, start - offset, stop - offset, tuple(p.shape)), nn.Parameter(flat[start:stop]),
                            start - low, grad[start - low : stop - low])
                held.attach()
                pieces.append(held)
        offsets = {fqn: (offset, p) for fqn, offset, p in entries}
        out.append(Shard(replica, index, position, size, group, grad, pieces, offsets))
    return out


@dataclass(frozen=True)
class _Elementwise:
    """Marks a per-element optimizer state entry (gathered by all-gather, not by object)."""

    dtype: torch.dtype


class ShardedSync(GradSync):
    """GradSync with reduce-scatter into this rank's shards, exact tied sums and the parameter all-gather."""

    @cached_property
    def shards(self) -> list[Shard]:
        """This rank's shards of every local replica, stage by stage (the order of every collective here)."""
        out: list[Shard] = []
        for stage, replica in sorted(self.replicas.items()):
            ranks = replica_ranks(self.placement, stage, self.dp)
            out += shards_of(replica, ranks, self.rank, self.groups.get(stage))
        return out

    @cached_property
    def pieces(self) -> dict[int, Piece]:
        """id of an optimizer parameter -> the part of an original parameter it is (for checkpoints)."""
        return {id(h.param): h.piece for s in self.shards for h in s.pieces}

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer factory is given: this rank's pieces, stage by stage."""
        return [h.param for s in self.shards for h in s.pieces]

    def start(self, replica: StageReplica) -> None:
        """Launch the async reduce-scatter of ``replica``'s flat gradient buffers into this rank's shards."""
        started = time.perf_counter()
        for s in self.shards:
            if s.replica is replica and s.size > 1:
                work = dist.reduce_scatter_single(s.grad, replica.flat_grads[s.index], group=s.group, async_op=True)
                self._pending.append((replica.stage, work, started))

    def finish(self) -> None:
        """Wait for every reduce-scatter, re-attach the pieces' gradients, then sum tied parameters exactly."""
        self.wait_pending("gradient reduce-scatter", "reduce-scatter")
        for s in self.shards:
            for held in s.pieces:
                held.attach()
        if self.shared:
            self._tied_into_shards()

    def _tied_into_shards(self) -> None:
        """Each tied parameter's gradient is the sum of every copy's local gradient (all stages, all copies)."""
        by_dtype: dict[torch.dtype, list[str]] = {}
        for fqn in sorted(self.shared):
            by_dtype.setdefault(self.shared_specs[fqn].dtype, []).append(fqn)
        for dtype, names in by_dtype.items():
            parts, starts = [], {}
            for fqn in names:
                local = [r.params[fqn].grad.reshape(-1) for r in self.replicas.values()
                         if fqn in r.params and r.params[fqn].grad is not None]
                numel = math.prod(self.shared_specs[fqn].shape)
                starts[fqn] = sum(p.numel() for p in parts)
                zeros = torch.zeros(numel, dtype=dtype, device=self.device)
                parts.append(torch.stack(local).sum(0) if local else zeros)
            total = torch.cat(parts)
            self._bounded(dist.all_reduce(total, async_op=True), f"all-reduce of tied parameters {names}")
            for s in self.shards:
                for h in s.pieces:
                    if h.piece.fqn in starts:
                        low = starts[h.piece.fqn]
                        h.grad.copy_(total[low + h.piece.start : low + h.piece.stop])

    def gather(self) -> None:
        """Every copy gets the full updated parameters: all-gather each shard over its group (bounded waits)."""
        self.recorder = None  # after the step's record: not part of its timeline
        started, kept = time.perf_counter(), []  # kept: each send buffer, alive until its wait ends
        for s in self.shards:
            if s.size > 1:
                mine = s.values().clone()
                kept.append(mine)
                self._pending.append((s.replica.stage, dist.all_gather_single(s.flat, mine, group=s.group,
                                                                              async_op=True), started))
        self.wait_pending("parameter all-gather", "all-gather")

    def _gathered(self, shard: Shard, mine: torch.Tensor) -> torch.Tensor:
        """The whole flat buffer from every position's ``mine`` (the shard's range of a like buffer)."""
        if shard.size == 1:
            return mine
        full = torch.empty(shard.flat.numel(), dtype=mine.dtype, device=mine.device)
        peers = [r for r in replica_ranks(self.placement, shard.replica.stage, self.dp) if r != self.rank]
        self._bounded(dist.all_gather_single(full, mine, group=shard.group, async_op=True),
                      f"all-gather of stage {shard.replica.stage} with ranks {peers}")
        return full

    def mode_values(self, optimizer: torch.optim.Optimizer | None, weights: str) -> dict[str, torch.Tensor]:
        """Full copies of the trained parameters in mode ``weights`` for an optimizer with ``mode_weights``
        (Schedule-Free's x or y, computed on the shards and all-gathered); {} for any other optimizer."""
        mode_weights = getattr(optimizer, "mode_weights", None)
        if not callable(mode_weights):
            return {}
        by_id = {id(p): value for p, value in mode_weights(weights == "train")}
        out: dict[str, torch.Tensor] = {}
        for s in self.shards:
            mine = s.values().clone()
            for h in s.pieces:
                mine[h.at : h.at + h.grad.numel()] = by_id[id(h.param)]
            full = self._gathered(s, mine)
            for fqn, offset, p in s.replica.layout[s.index]:
                out.setdefault(fqn, full[offset : offset + p.numel()].view_as(p).clone())
        return out

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> OptimizerState:
        """The optimizer's state by original name and whole (collective over each stage group): per-element
        entries are all-gathered, every other entry (a step count) is taken from the piece that has it."""
        sd = optimizer.state_dict()
        order = [p for g in optimizer.param_groups for p in g["params"]]
        by_id = {id(order[i]): value for i, value in sd["state"].items()}
        state: dict[str, dict[str, object]] = {}
        for s in self.shards:
            mine: dict[str, dict[str, object]] = {}
            for h in s.pieces:
                mine[h.piece.fqn] = {k: _Elementwise(v.dtype) if _per_element(v, h.param) else v
                                     for k, v in by_id.get(id(h.param), {}).items()}
            everyone = self._objects(s, mine)
            kinds = sorted({(k, v.dtype) for part in everyone for st in part.values() for k, v in st.items()
                            if isinstance(v, _Elementwise)}, key=str)
            for key, dtype in kinds:
                full = self._gathered(s, self._local_entry(s, key, dtype, by_id))
                for part in everyone:
                    for fqn, st in part.items():
                        if isinstance(st.get(key), _Elementwise):
                            offset, p = s.offsets[fqn]
                            value = full[offset : offset + p.numel()].view_as(p).clone()
                            state.setdefault(fqn, {}).setdefault(key, value)
            for part in everyone:
                for fqn, st in part.items():
                    for k, v in st.items():
                        if not isinstance(v, _Elementwise):
                            state.setdefault(fqn, {}).setdefault(k, v)
        names = [self.pieces[id(p)].fqn for p in order]
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": list(dict.fromkeys(names[i] for i in g["params"]))} for g in sd["param_groups"]]
        return OptimizerState(state=state, param_groups=groups)

    @staticmethod
    def _local_entry(s: Shard, key: str, dtype: torch.dtype, by_id: dict[int, dict[str, object]]) -> torch.Tensor:
        """The shard's range of a flat buffer holding entry ``key`` of this rank's pieces (zero elsewhere)."""
        values = {h.at: by_id.get(id(h.param), {}).get(key) for h in s.pieces}
        mine = torch.zeros(s.grad.numel(), dtype=dtype, device=s.flat.device)
        for at, value in values.items():
            if isinstance(value, torch.Tensor):
                mine[at : at + value.numel()] = value
        return mine

    def _objects(self, s: Shard, mine: dict[str, dict[str, object]]) -> list[dict[str, dict[str, object]]]:
        """Every position's ``mine`` (small: no per-element tensors), in group order."""
        if s.size == 1:
            return [mine]
        everyone: list[dict[str, dict[str, object]] | None] = [None] * s.size
        dist.all_gather_object(everyone, mine, group=s.group)
        return [part or {} for part in everyone]

    def _bounded(self, work: dist.Work, what: str) -> None:
        try:
            work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise PipelineRuntimeError(
                f"rank {self.rank}: {what} did not finish within {self.timeout}s ({exc}); a peer died, stalled or "
                "failed earlier (see its error)"
            ) from exc


def _per_element(value: object, piece: nn.Parameter) -> bool:
    """A state entry with one value per element of the piece (z, exp_avg_sq, momentum), not a step count."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == piece.shape
