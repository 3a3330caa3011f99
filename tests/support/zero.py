"""Bodies of launched ranks for the sharded-optimizer tests (D = 2 x data-parallel 2, float64 GPT with tied
embedding and head): the same training sharded and unsharded, and checkpoints across sharding."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import bitpipe_fx as bp
from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from bitpipe_fx.schedules import generate
from tests.support.reference import max_rel_err
from tests.support.toy import Toy, mse, toy_split

D, DP, N = 2, 2, 4
Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Factory] = {
    "sf-adamw": lambda ps: bp.optim.ScheduleFreeAdamW(ps, lr=1e-2, warmup_steps=2, weight_decay=0.01),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
}


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This pipeline's part of ``count`` global batches (dp index k takes the k-th half)."""
    k = dist.get_rank() // D
    out = []
    for i in range(count):
        tokens, targets = lm_batch(128, 2 * N * DP, 16, seed=80 + i)
        out.append((tokens.tensor_split(DP)[k], targets.tensor_split(DP)[k]))
    return out


def _pipe(model: nn.Module, example: tuple, schedule: str, optimizer: str, shard: bool) -> bp.CompiledPipeline:
    pipe = bp.compile(copy.deepcopy(model), example, lm_loss, schedule=schedule, devices=D, microbatches=N,
                      optimizer=OPTIMIZERS[optimizer], data_parallel=DP, shard_optimizer=shard, timeout=60.0)
    return pipe.train()


def state_numel(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the optimizer's per-element state tensors on this rank (step counts left out)."""
    return sum(v.numel() for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def _params(pipe: bp.CompiledPipeline) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in pipe.named_parameters().items()}


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _param_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(max_rel_err(a[k], b[k]) for k in a)


def equality_worker(schedule: str) -> dict[str, object]:
    """Both optimizers, 3 steps, sharded vs unsharded: losses, parameters, eval-mode weights, state sizes."""
    torch.set_num_threads(1)
    model, example = gpt()
    model = model.double()
    batches = _batches(3)
    out: dict[str, object] = {"rank": dist.get_rank()}
    for name in OPTIMIZERS:
        runs = {}
        for shard in (False, True):
            pipe = _pipe(model, example, schedule, name, shard)
            losses = [pipe.step(*b) for b in batches]
            trained = pipe.trained_state_dict("eval", everywhere=True)
            pipe.eval()
            runs[shard] = (losses, _params(pipe), trained, pipe.evaluate(*batches[0]), state_numel(pipe.optimizer))
        (l0, p0, t0, e0, n0), (l1, p1, t1, e1, n1) = runs[False], runs[True]
        initial = {k: v.detach() for k, v in model.named_parameters() if k in p1}
        out[name] = {"loss_err": _rel(l1, l0), "param_err": _param_err(p1, p0), "export_err": _param_err(t1, t0),
                     "eval_err": abs(e1 - e0) / abs(e0), "numel": (n0, n1), "moved": _param_err(p1, initial)}
    return out


def checkpoint_worker(folder: str) -> dict[str, object]:
    """Saved sharded (bitpipe) -> loaded unsharded (1f1b), and saved unsharded -> loaded sharded: each
    continuation equals the uninterrupted run's (2 steps after 2)."""
    torch.set_num_threads(1)
    model, example = gpt()
    model = model.double()
    batches = _batches(4)
    out: dict[str, object] = {"rank": dist.get_rank()}
    for shard in (True, False):
        path = Path(folder) / f"saved-{'sharded' if shard else 'whole'}"
        first = _pipe(model, example, "bitpipe", "sf-adamw", shard)
        for b in batches[:2]:
            first.step(*b)
        first.save_checkpoint(path)
        saved = first.state_dict()["optimizer"]["state"]  # whole per FQN, sharded or not
        expected = [first.step(*b) for b in batches[2:]]
        second = _pipe(model, example, "1f1b", "sf-adamw", not shard)
        second.load_checkpoint(path)
        loaded = second.state_dict()["optimizer"]["state"]
        same = all(torch.equal(v, saved[fqn][k]) for fqn, st in loaded.items() for k, v in st.items())
        shapes = {fqn: tuple(st["z"].shape) for fqn, st in loaded.items()}
        got = [second.step(*b) for b in batches[2:]]
        mine, reference = _params(second), _params(first)  # bitpipe's ranks hold every stage, 1f1b's one
        out["sharded" if shard else "whole"] = {"loss_err": _rel(got, expected), "compared": len(mine),
                                                "state_equal": same, "state_keys": len(loaded),
                                                "z_shapes_ok": shapes == {k: tuple(v.shape) for k, v in mine.items()},
                                                "param_err": _param_err(mine, {k: reference[k] for k in mine})}
    return out


def stall_worker(timeout: float) -> None:
    """D = 1 x data-parallel 2, sharded: in step 2 rank 1 stalls in its loss, so rank 0 waits in the gradient
    reduce-scatter and must raise PipelineRuntimeError within ``timeout``."""
    torch.set_num_threads(1)
    calls = [0]

    def stalling_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if dist.get_rank() == 1 and calls[0] == 3:
            time.sleep(10 * timeout)
        return mse(out, y)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Toy(depth=2)
    pipe = CompiledPipeline(toy_split(model, 1), generate("1f1b", 1, 2), stalling_loss, torch.zeros(2, 5),
                            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), data_parallel=2, timeout=timeout,
                            shard_optimizer=True)
    x, y = torch.randn(4, 5), torch.randn(4, 5)
    pipe.step(x, y)
    pipe.step(x, y)
    raise AssertionError(f"rank {dist.get_rank()} finished a step whose peer stalled")
