"""Batch-norm running statistics updated in micro-batch order, as non-pipelined accumulation would.

A replica sees only some micro-batches, in the schedule's order. So before each train-mode forward its
running buffers are zeroed, and afterwards they hold exactly ``momentum * batch_statistic`` of that
micro-batch (the kernel's update ``momentum * stat + (1 - momentum) * running`` with running = 0); this is
recorded by global micro-batch index g. After the run, the records of every copy of the stage (replicas and
data-parallel pipelines: each g is recorded by exactly one copy, so summing the zero-padded records is
exact) are replayed from the step's starting values in order g = 0..M-1 with the kernel's own arithmetic,
``running = record_g + (1 - momentum) * running``, and ``num_batches_tracked`` becomes start + M. Every copy
ends with the same buffers, equal to the sequential updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from bitpipe_fx.passes.stages import RunningStat


class RunningStats:
    """The running-statistics buffers of one stage replica and this step's per-micro-batch records."""

    def __init__(self, module: torch.nn.Module, stats: Sequence[RunningStat]) -> None:
        buffers = dict(module.named_buffers())
        self.stats = tuple(stats)
        self.pairs = [(buffers[s.mean], buffers[s.var], s.momentum) for s in self.stats]
        self.counters = [buffers[s.tracked] for s in self.stats if s.tracked is not None]
        self.width = sum(m.numel() + v.numel() for m, v, _ in self.pairs)
        self.records: dict[int, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def begin(self) -> None:
        """Remember the step's starting values (once per run, before the first forward)."""
        self.start = [(m.clone(), v.clone()) for m, v, _ in self.pairs]
        self.start_counts = [c.clone() for c in self.counters]
        self.records = {}

    def undo(self) -> None:
        """Back to the step's starting values (a step whose update is dropped)."""
        with torch.no_grad():
            for (m, v, _), (m0, v0) in zip(self.pairs, self.start):
                m.copy_(m0)
                v.copy_(v0)
            for c, c0 in zip(self.counters, self.start_counts):
                c.copy_(c0)

    def before_forward(self) -> None:
        """Zero the running buffers through ``.data``: earlier forwards' autograd graphs saved them (unused
        in train mode), and a version bump would refuse those backwards."""
        for m, v, _ in self.pairs:
            m.data.zero_()
            v.data.zero_()

    @contextmanager
    def kept(self) -> Iterator[None]:
        """Run the body (a recomputed forward) and put the running buffers back as they were, through ``.data``
        (no version bump), so that a micro-batch updates the statistics once, at its F."""
        buffers = [t for m, v, _ in self.pairs for t in (m, v)] + self.counters
        before = [t.detach().clone() for t in buffers]
        try:
            yield
        finally:
            for t, b in zip(buffers, before):
                t.data.copy_(b)

    def after_forward(self, g: int) -> None:
        """Keep global micro-batch g's ``momentum * statistic`` values."""
        self.records[g] = torch.cat([t.detach().reshape(-1) for m, v, _ in self.pairs for t in (m, v)])

    def table(self, total: int) -> torch.Tensor:
        """(total, width + 1) records of this copy, zero where another copy saw the micro-batch; the last
        column is 1 where this copy recorded one."""
        device = self.pairs[0][0].device
        out = torch.zeros(total, self.width + 1, dtype=self.pairs[0][0].dtype, device=device)
        for g, row in self.records.items():
            out[g, :-1] = row
            out[g, -1] = 1
        return out

    def replay(self, table: torch.Tensor) -> None:
        """Set the buffers to the sequential updates over micro-batches 0..total-1 from the starting values."""
        seen = [g for g in range(table.shape[0]) if table[g, -1] > 0]
        if not seen:
            return  # no train-mode forward on any copy (evaluation in eval mode)
        with torch.no_grad():
            offset = 0
            for (m, v, momentum), (m0, v0) in zip(self.pairs, self.start):
                for buf, start in ((m, m0), (v, v0)):
                    rows = table[:, offset : offset + buf.numel()]
                    running = start.reshape(-1).clone()
                    for g in seen:
                        running = rows[g] + (1 - momentum) * running
                    buf.copy_(running.view_as(buf))
                    offset += buf.numel()
            for c, c0 in zip(self.counters, self.start_counts):
                c.copy_(c0 + len(seen))


def replay_in_process(copies: Sequence[RunningStats], total: int) -> None:
    """Every copy of one stage held by this process gets the sequential updates (local executor)."""
    copies = [c for c in copies if c]
    if copies:
        table = torch.stack([c.table(total) for c in copies]).sum(0)
        for c in copies:
            c.replay(table)


def replay_over(stats: RunningStats, total: int, group: object | None, wait: Callable[[Any, str], None]) -> None:
    """This rank's copy gets the sequential updates, the records summed over the stage's copies in ``group``
    (its replica ranks x data-parallel pipelines; None when it has one copy)."""
    table = stats.table(total)
    if group is not None:
        wait(dist.all_reduce(table, group=group, async_op=True), "the batch-norm statistics all-reduce")
    stats.replay(table)
