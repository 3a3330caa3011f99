"""A model whose loss or gradient goes non-finite on chosen micro-batches; local and launched checks use it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.errors import NonFiniteError
from bitpipe_fx.passes import capture, estimate_costs, partition, split
from bitpipe_fx.schedules import generate
from tests.support.reference import sgd

N, ROWS = 4, 2


def chain() -> nn.Module:
    """Bias-free layers: a zero input row gives a zero output, where ``sqrt_loss`` has a NaN gradient."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 8, bias=False), nn.Tanh(),
                             nn.Linear(8, 1, bias=False)).double()


def sqrt_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Finite everywhere, but its gradient at out == y is NaN."""
    return ((out - y).abs() + (out - y).abs().sqrt()).mean()


def pipeline(schedule: str, devices: int, policy: str, data_parallel: int = 1) -> CompiledPipeline:
    example = torch.zeros(ROWS, 4, dtype=torch.float64)
    captured = capture(chain(), (example,))
    program = generate(schedule, devices, N)
    cut = split(captured, partition(estimate_costs(captured), program.placement))
    return CompiledPipeline(cut, program, sqrt_loss, (example,), optimizer=sgd, data_parallel=data_parallel,
                            on_nonfinite=policy)


def batch(bad: str | None, microbatch: int, rows: int = N * ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch; ``bad="loss"``: a NaN target in ``microbatch``; ``bad="gradient"``: that micro-batch all zero."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 4, generator=g, dtype=torch.float64)
    y = torch.randn(rows, 1, generator=g, dtype=torch.float64)
    part = slice(microbatch * ROWS, (microbatch + 1) * ROWS)
    if bad == "loss":
        y[part] = float("nan")
    elif bad == "gradient":
        x[part], y[part] = 0.0, 0.0
    return x, y


def nonfinite_worker(schedule: str) -> dict[str, object]:
    """On each of 2 ranks (D=2): a good step, then a bad-gradient step under raise and under skip."""
    torch.set_num_threads(1)
    out: dict[str, object] = {"rank": dist.get_rank()}
    for policy in ("raise", "skip"):
        pipe = pipeline(schedule, 2, policy)
        pipe.step(*batch(None, 0))
        before = {k: p.detach().clone() for k, p in pipe.named_parameters().items()}
        try:
            pipe.step(*batch("gradient", 3))
            out[policy] = None
        except NonFiniteError as exc:
            out[policy] = f"{type(exc).__name__}: {exc}"
        out[f"{policy}_unchanged"] = all(torch.equal(p, before[k]) for k, p in pipe.named_parameters().items())
        out[f"{policy}_skipped"] = pipe.skipped_steps
        out[f"{policy}_first_params"] = {r.stage: next(iter(r.params)) for r in pipe.executor.replicas}
    return out
