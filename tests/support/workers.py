"""Bodies of launched ranks: module-level functions, so that spawned processes can import them by name."""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.api import compile as bp_compile
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from bitpipe_fx.schedules import generate
from tests.support.cases import ModelCase, contract_errors, model_case
from tests.support.toy import Toy, mse, toy_split


def contract_worker(jobs: list[tuple[str, str, int, int, int]], timeout: float = 30.0,
                    recompute: bool = False) -> list[dict[str, object]]:
    """On every rank: ``contract_errors`` for each (model, schedule, devices, microbatches, data_parallel); with
    ``recompute`` every stage recomputes its forward."""
    torch.set_num_threads(1)
    cases: dict[tuple[str, int], ModelCase] = {}
    out = []
    for model, schedule, devices, microbatches, dp in jobs:
        key = (model, devices if model == "toy" else 0)  # the toy's depth must divide into 2D stages
        if key not in cases:
            cases[key] = model_case(model, max_stages=2 * devices)
        program = generate(schedule, devices, microbatches)
        result = contract_errors(cases[key], program, data_parallel=dp, timeout=timeout,
                                 recompute=(True,) * program.stages if recompute else ())
        out.append(result | {"rank": dist.get_rank()})
    return out


def compile_worker(trace_path: str, timeout: float = 30.0) -> dict[str, object]:
    """On every rank: compile() end to end with D = world size; a recorded step, resume, gather, refusal."""
    torch.set_num_threads(1)
    world = dist.get_world_size()

    def adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=0.01)

    n = 2 * world
    batches = [lm_batch(128, 2 * n, 16, seed=50 + i) for i in range(3)]
    model, example = gpt()
    pipe = bp_compile(model, example, lm_loss, schedule="bitpipe", devices=world, microbatches=n,
                      optimizer=adam, timeout=timeout, trace_path=trace_path)
    losses = [pipe.step(*batches[0], record=True)]
    timeline = list(pipe.last_timeline)
    buf = io.BytesIO()
    torch.save(pipe.state_dict(), buf)
    losses += [pipe.step(*b) for b in batches[1:]]
    buf.seek(0)
    resumed = bp_compile(gpt(seed=1)[0], example, lm_loss, schedule="bitpipe", devices=world,
                         microbatches=n, optimizer=adam, timeout=timeout)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    resumed_losses = [resumed.step(*b) for b in batches[1:]]
    a, b = pipe.state_dict(), resumed.state_dict()
    identical = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and all(
        torch.equal(v, b["optimizer"]["state"][f][k])
        for f, st in a["optimizer"]["state"].items() for k, v in st.items()
    )
    full = pipe.full_state_dict()
    eval_loss = pipe.evaluate(*batches[0])
    full_ok, eval_err = None, None
    if dist.get_rank() == 0:  # the gathered model, run without the pipeline, gives the pipeline's eval loss
        fresh = gpt(seed=2)[0]
        fresh.load_state_dict(full, strict=True)
        full_ok = list(full) == list(model.state_dict())
        with torch.no_grad():
            parts = zip(batches[0][0].tensor_split(n), batches[0][1].tensor_split(n))
            ref = sum(float(lm_loss(fresh(x), y)) for x, y in parts) / n
        eval_err = abs(eval_loss - ref) / ref
    try:
        bp_compile(model, example, lm_loss, schedule="1f1b", devices=world + 1, microbatches=2)
        refusal = ""
    except ConfigError as exc:
        refusal = str(exc)
    return {"rank": dist.get_rank(), "losses": losses, "resumed_losses": resumed_losses, "identical": identical,
            "timeline": timeline, "full_ok": full_ok, "eval_loss": eval_loss, "eval_err": eval_err,
            "refusal": refusal, "program": pipe.program.to_json()}


def sequence_worker(calls: list[tuple[Callable[..., object], tuple]]) -> list[object]:
    """On every rank: run several worker bodies in one launched group (spawning costs seconds)."""
    return [fn(*args) for fn, args in calls]


def fault_worker(mode: str, timeout: float) -> None:
    """2 ranks, 1f1b: step 1 is fine; in step 2, rank 1 (the last stage) raises or stalls in its 3rd loss.

    Rank 0 must then raise PipelineRuntimeError within ``timeout`` (+ slack); its message names rank 1.
    """
    torch.set_num_threads(1)
    calls = [0]

    def flaky_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == 4 + 3:
            if mode == "raise":
                raise ValueError("injected failure in loss_fn on rank 1")
            if mode == "die":
                os._exit(3)
            time.sleep(10 * timeout)
        return mse(out, y)

    program = generate("1f1b", 2, 4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Toy(depth=2)
    pipe = CompiledPipeline(toy_split(model, 2), program, flaky_loss, torch.zeros(2, 5),
                            optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), timeout=timeout)
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    pipe.step(x, y)
    start = time.monotonic()
    try:
        pipe.step(x, y)
    except Exception as exc:
        raise type(exc)(f"{exc} [rank {dist.get_rank()} failed {time.monotonic() - start:.1f}s into the step]") from exc
    raise AssertionError(f"rank {dist.get_rank()} finished a step whose peer failed")


def fault_main() -> None:
    """Body of a script for ``python -m bitpipe_fx.runtime.launch``: ``fault_worker(argv[1], argv[2])``."""
    fault_worker(sys.argv[1], float(sys.argv[2]))
