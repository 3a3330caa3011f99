"""Testing aids for the runtime: a toy model cut into stages by hand, a generic valid program, the reference.

The toy has a tied "embedding"/head weight (shared by the first and last stage), a skip connection carried
through the middle stages, and reads the model input again in the last stage: the contract's hard cases.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitpipe_fx.passes.stages import SplitModel, StageSpec
from bitpipe_fx.schedules.build import assemble
from bitpipe_fx.schedules.ir import Action, Placement, Program


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.lin(h))


class Toy(nn.Module):
    """x (b, vocab) -> logits (b, vocab); emb.weight is tied to the head."""

    def __init__(self, depth: int, width: int = 6, vocab: int = 5) -> None:
        super().__init__()
        self.emb = nn.Linear(vocab, width, bias=False)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head_bias = nn.Parameter(torch.linspace(-0.1, 0.1, vocab))

    def forward(self, x):
        h0 = self.emb(x)
        h = h0
        for b in self.blocks:
            h = b(h)
        return F.linear(h + h0, self.emb.weight.t(), self.head_bias) + 0.5 * x


class _Stage(nn.Module):
    def __init__(self, model: Toy, lo: int, hi: int, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        if first or last:
            self.emb = model.emb
        self.blocks = nn.Module()
        for i in range(lo, hi):
            self.blocks.add_module(str(i), model.blocks[i])
        if last:
            self.head_bias = model.head_bias

    def forward(self, *vals):
        if self.first:
            x = vals[0]
            h = h0 = self.emb(x)
            rest = vals[1:]
        else:
            x, h, h0 = (vals[0], *vals[1:]) if self.last else (None, *vals)
            rest = ()
        assert not rest
        for b in self.blocks.children():
            h = b(h)
        if self.last:
            return (F.linear(h + h0, self.emb.weight.t(), self.head_bias) + 0.5 * x,)
        return (h, h0)


def toy_split(model: Toy, stages: int) -> SplitModel:
    """Cut ``model`` into ``stages`` stages (depth must be a multiple of stages)."""
    per = len(model.blocks) // stages
    mods, specs = [], []
    for k in range(stages):
        first, last = k == 0, k == stages - 1
        mod = _Stage(model, k * per, (k + 1) * per, first, last)
        model_inputs = ("x",) if first or last else ()
        inputs = () if first else ("h", "h0")
        outputs = ("logits",) if last else ("h", "h0")
        params = tuple(n for n, _ in mod.named_parameters())
        mods.append(mod)
        specs.append(StageSpec(k, model_inputs, inputs, outputs, params))
    shared = {"emb.weight": (0, stages - 1)} if stages > 1 else {}
    return SplitModel(mods, tuple(specs), ("x",), lambda a, kw: [a[0] if a else kw["x"]], lambda o: o[0], shared)


def naive_program(placement: Placement, pipe_of: tuple[int, ...], split_backward: bool = False, name="naive"):
    """A valid program for any placement: forwards by (micro-batch, stage), then backwards by
    (micro-batch, -stage); with ``split_backward`` each B becomes I, and every W runs at the end."""
    D, S = placement.devices, placement.stages
    per_device: list[list[Action]] = [[] for _ in range(D)]
    for m, p in enumerate(pipe_of):
        for s in range(S):
            per_device[placement.device(p, s)].append(Action("F", p, s, m))
    for m, p in enumerate(pipe_of):
        for s in reversed(range(S)):
            per_device[placement.device(p, s)].append(Action("I" if split_backward else "B", p, s, m))
    if split_backward:
        for m, p in enumerate(pipe_of):
            for s in reversed(range(S)):
                per_device[placement.device(p, s)].append(Action("W", p, s, m))
    return assemble(name, placement, pipe_of, per_device)


def _rows(value: Any, n: int) -> list[Any]:
    """A tensor or a tuple of tensors split along dim 0 into n parts."""
    if isinstance(value, torch.Tensor):
        return list(value.tensor_split(n))
    return [tuple(part) for part in zip(*(v.tensor_split(n) for v in value))]


def reference_grads(model: nn.Module, inputs: Any, targets: Any, n: int, loss_fn: Callable):
    """Non-pipelined reference: for m, (loss_fn(model(*x_m), y_m) / n).backward(); returns (loss, grads by FQN)."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for xm, ym in zip(_rows(inputs, n), _rows(targets, n)):
        loss = loss_fn(model(*(xm if isinstance(xm, tuple) else (xm,))), ym) / n
        loss.backward()
        total += float(loss.detach())
    return total, {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max |b| (the absolute difference when b vanishes)."""
    scale = b.abs().max().item()
    diff = (a.double() - b.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


# ---- the numerics contract on example models (used in-process and by spawned ranks) ---------------------


@dataclass
class ModelCase:
    """A model, its traced micro-batch, its loss, a batch maker, and a way to cut it for a program."""

    name: str
    model: nn.Module
    example_inputs: tuple
    loss_fn: Callable
    batch: Callable[[int, int], tuple[Any, Any]]  # (rows, seed) -> (inputs, targets)
    split_for: Callable[[Program], SplitModel]
    _batches: dict[tuple[int, int], tuple[Any, Any]] = field(default_factory=dict)

    def batches(self, rows: int, seed: int) -> tuple[Any, Any]:
        """``batch(rows, seed)``, made once (the same tensors each time)."""
        if (rows, seed) not in self._batches:
            self._batches[(rows, seed)] = self.batch(rows, seed)
        return self._batches[(rows, seed)]


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def model_case(name: str, dtype: torch.dtype = torch.float64, max_stages: int = 8) -> ModelCase:
    """"toy" (hand split), "gpt", "bert" (bitpipe_fx.examples) or "hf-gpt2" (transformers, small config).

    Captured once; ``split_for(program)`` partitions and splits for the program's placement.
    """
    if name == "toy":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = Toy(depth=max_stages).to(dtype)

        def toy_batch(rows: int, seed: int) -> tuple[Any, Any]:
            g = torch.Generator().manual_seed(seed)
            return torch.randn(rows, 5, generator=g, dtype=dtype), torch.randn(rows, 5, generator=g, dtype=dtype)

        return ModelCase(name, model, (torch.zeros(2, 5, dtype=dtype),), _mse, toy_batch,
                         lambda program: toy_split(model, program.stages))
    from bitpipe_fx.examples import models as ex
    from bitpipe_fx.passes import capture, estimate_costs, partition, split

    if name == "gpt":
        model, example = ex.gpt(layers=4)

        def batch(rows: int, seed: int) -> tuple[Any, Any]:
            tokens, targets = ex.lm_batch(128, rows, 16, seed=seed)
            return (tokens,), targets
    elif name == "bert":
        model, example = ex.bert(layers=4)

        def batch(rows: int, seed: int) -> tuple[Any, Any]:
            tokens, mask, targets = ex.mlm_batch(128, rows, 16, seed=seed)
            return (tokens, mask), targets
    elif name == "hf-gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=4, n_head=2, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = GPT2LMHeadModel(cfg)
        example = (ex.lm_batch(96, 2, 12, seed=1)[0],)

        def batch(rows: int, seed: int) -> tuple[Any, Any]:
            tokens, targets = ex.lm_batch(96, rows, 12, seed=seed)
            return (tokens,), targets
    else:
        raise ValueError(f"unknown model case {name!r}")
    model = model.to(dtype)
    captured = capture(model, example)
    costs = estimate_costs(captured)

    def split_for(program: Program) -> SplitModel:
        per_pipe = [program.pipe_of.count(p) for p in range(program.pipes)]
        return split(captured, partition(costs, program.placement, pipe_microbatches=per_pipe))

    return ModelCase(name, model, example, ex.lm_loss, batch, split_for)


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The contract's optimizer: linear in the gradients, so it does not amplify rounding noise."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


@dataclass(frozen=True)
class ReferenceRun:
    """The non-pipelined run the contract compares with: first loss and gradients, parameters after the steps."""

    loss: float
    grads: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]


_REFERENCES: dict[tuple, ReferenceRun] = {}


def reference_run(case: ModelCase, inputs: Any, targets: Any, n: int, steps: int) -> ReferenceRun:
    """Reference passes over n micro-batches with ``steps`` SGD steps; cached per case and batch (it does not
    depend on the schedule)."""
    key = (id(case), n, steps, *(t.data_ptr() for t in _leaves(inputs, targets)))
    if key not in _REFERENCES:
        ref = copy.deepcopy(case.model)
        loss, grads = reference_grads(ref, inputs, targets, n, case.loss_fn)
        opt = sgd(list(ref.parameters()))
        for i in range(steps):
            if i:
                reference_grads(ref, inputs, targets, n, case.loss_fn)
            opt.step()
        _REFERENCES[key] = ReferenceRun(loss, grads, {k: p.detach().clone() for k, p in ref.named_parameters()})
    return _REFERENCES[key]


def _leaves(*values: Any) -> list[torch.Tensor]:
    return [t for v in values for t in ((v,) if isinstance(v, torch.Tensor) else v)]


def contract_errors(
    case: ModelCase, program: Program, data_parallel: int = 1, steps: int = 3, rows_per_microbatch: int = 2,
    seed: int = 7, **pipe_options: Any,
) -> dict[str, Any]:
    """Run the numerics contract for one (model, program): relative errors of the loss, of every gradient
    this process holds (by FQN) and of the parameters after ``steps`` SGD steps, against the reference.

    Under torch.distributed, this rank's data-parallel shard is its part of the global batch.
    """
    import torch.distributed as dist

    from bitpipe_fx.api import CompiledPipeline

    dp_index = dist.get_rank() // program.devices if dist.is_initialized() else 0
    n = program.microbatches
    inputs, targets = case.batches(rows_per_microbatch * n * data_parallel, seed)
    mine = (_rows(inputs, data_parallel)[dp_index], _rows(targets, data_parallel)[dp_index])
    pipe = CompiledPipeline(case.split_for(program), program, case.loss_fn, case.example_inputs, optimizer=sgd,
                            data_parallel=data_parallel, **pipe_options)
    loss = pipe.forward_backward(*mine)
    grads = pipe.gradients()
    for _ in range(steps):
        pipe.step(*mine)
    ref = reference_run(case, inputs, targets, n * data_parallel, steps)
    grad_err = max(max_rel_err(g, ref.grads[k]) for k, g in grads.items())
    param_err = max(max_rel_err(p.detach(), ref.params[k]) for k, p in pipe.named_parameters().items())
    return {
        "model": case.name, "schedule": program.name, "devices": program.devices, "dp": data_parallel,
        "loss_err": abs(loss - ref.loss) / abs(ref.loss), "grad_err": grad_err, "param_err": param_err,
        "fqns": sorted(grads), "all_fqns": sorted(ref.grads),
    }


# ---- bodies of launched ranks (module-level so that spawned processes can import them) ------------------


def contract_worker(jobs: list[tuple[str, str, int, int, int]], timeout: float = 30.0) -> list[dict[str, Any]]:
    """On every rank: ``contract_errors`` for each (model, schedule, devices, microbatches, data_parallel)."""
    import torch.distributed as dist

    from bitpipe_fx.schedules import generate

    torch.set_num_threads(1)
    cases: dict[tuple[str, int], ModelCase] = {}
    out = []
    for model, schedule, devices, microbatches, dp in jobs:
        key = (model, devices if model == "toy" else 0)  # the toy's depth must divide into 2D stages
        if key not in cases:
            cases[key] = model_case(model, max_stages=2 * devices)
        result = contract_errors(cases[key], generate(schedule, devices, microbatches), data_parallel=dp,
                                 timeout=timeout)
        out.append(result | {"rank": dist.get_rank()})
    return out


def compile_worker(trace_path: str, timeout: float = 30.0) -> dict[str, Any]:
    """On every rank: compile() end to end with D = world size; a recorded step, resume, gather, refusal."""
    import io

    import torch.distributed as dist

    from bitpipe_fx.api import compile as bp_compile
    from bitpipe_fx.errors import ConfigError
    from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss

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


def sequence_worker(calls: list[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """On every rank: run several worker bodies in one launched group (spawning costs seconds)."""
    return [fn(*args) for fn, args in calls]


def fault_worker(mode: str, timeout: float) -> None:
    """2 ranks, 1f1b: step 1 is fine; in step 2, rank 1 (the last stage) raises or stalls in its 3rd loss.

    Rank 0 must then raise PipelineRuntimeError within ``timeout`` (+ slack); its message names rank 1.
    """
    import time

    import torch.distributed as dist

    from bitpipe_fx.api import CompiledPipeline
    from bitpipe_fx.schedules import generate

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
        return _mse(out, y)

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
    import sys

    fault_worker(sys.argv[1], float(sys.argv[2]))
