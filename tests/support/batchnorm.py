"""A batch-norm MLP, its batches and its non-pipelined reference; the body of the 4-process check."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.passes import capture, estimate_costs, partition, split
from bitpipe_fx.schedules import generate
from bitpipe_fx.train.reference import accumulate
from tests.support.reference import max_rel_err, sgd

N, ROWS = 4, 3
Batch = tuple[torch.Tensor, torch.Tensor]


def bn_mlp() -> nn.Module:
    """An MLP with two batch norms (one without affine parameters) and dropout."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False),
            nn.Dropout(0.1), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1),
        ).double()


def sq(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def batches(count: int, dp: int = 1) -> list[Batch]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(N * ROWS * dp, 4, generator=g, dtype=torch.float64) * 2 + 1,
             torch.randn(N * ROWS * dp, 1, generator=g, dtype=torch.float64)) for _ in range(count)]


def reference(model: nn.Module, data: list[Batch], n: int) -> nn.Module:
    """SGD steps of non-pipelined gradient accumulation over the batches (micro-batches in order)."""
    ref = copy.deepcopy(model).train()
    opt = sgd(list(ref.parameters()))
    for step, (x, y) in enumerate(data):
        opt.zero_grad(set_to_none=True)
        accumulate(ref, [((xm,), ym) for xm, ym in zip(x.tensor_split(n), y.tensor_split(n))], sq, 0, step)
        opt.step()
    return ref


def pipeline(model: nn.Module, schedule: str, devices: int, data_parallel: int = 1,
             **options: object) -> CompiledPipeline:
    example = torch.zeros(ROWS, 4, dtype=torch.float64)
    captured = capture(model, (example,))
    program = generate(schedule, devices, N)
    cut = split(captured, partition(estimate_costs(captured), program.placement))
    return CompiledPipeline(cut, program, sq, (example,), optimizer=sgd, data_parallel=data_parallel,
                            **options)  # type: ignore[arg-type]


def batchnorm_worker(schedules: list[str]) -> list[dict[str, object]]:
    """On every rank of D=2 x data-parallel 2: 3 steps per schedule; this rank's state against the reference."""
    torch.set_num_threads(1)
    dp_index = dist.get_rank() // 2
    out = []
    for schedule in schedules:
        model, data = bn_mlp(), batches(3, dp=2)
        pipe = pipeline(model, schedule, 2, data_parallel=2)
        for x, y in data:
            pipe.step(x.tensor_split(2)[dp_index], y.tensor_split(2)[dp_index])
        want = reference(model, data, 2 * N).state_dict()
        mine = {k: v for r in pipe.executor.replicas for k, v in r.module.state_dict().items()}
        out.append({"schedule": schedule, "names": sorted(mine),
                    "errors": {k: max_rel_err(v, want[k]) for k, v in mine.items()}})
    return out
