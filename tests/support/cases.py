"""The numerics contract on example models: a model case (model, micro-batch, loss, batches, a way to cut
it for a program) and ``contract_errors``, used in-process and by spawned ranks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.examples import models as ex
from bitpipe_fx.passes import capture, estimate_costs, partition, split
from bitpipe_fx.passes.stages import SplitModel
from bitpipe_fx.schedules.ir import Program
from tests.support.reference import LossFn, Rows, max_rel_err, reference_run, rows, sgd
from tests.support.toy import Toy, mse, toy_split

Batch = tuple[Rows, Rows]  # (inputs, targets)


@dataclass
class ModelCase:
    """A model, its traced micro-batch, its loss, a batch maker, and a way to cut it for a program."""

    name: str
    model: nn.Module
    example_inputs: tuple
    loss_fn: LossFn
    batch: Callable[[int, int], Batch]  # (rows, seed) -> (inputs, targets)
    split_for: Callable[[Program], SplitModel]
    _batches: dict[tuple[int, int], Batch] = field(default_factory=dict)

    def batches(self, rows: int, seed: int) -> Batch:
        """``batch(rows, seed)``, made once (the same tensors each time)."""
        if (rows, seed) not in self._batches:
            self._batches[(rows, seed)] = self.batch(rows, seed)
        return self._batches[(rows, seed)]


def model_case(name: str, dtype: torch.dtype = torch.float64, max_stages: int = 8) -> ModelCase:
    """"toy" (hand split), "gpt", "bert" (bitpipe_fx.examples, BERT with dropout 0.1) or "hf-gpt2" (transformers,
    small config, dropout 0.1 everywhere).

    Captured once; ``split_for(program)`` partitions and splits for the program's placement.
    """
    if name == "toy":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            toy = Toy(depth=max_stages).to(dtype)

        def toy_batch(rows: int, seed: int) -> Batch:
            g = torch.Generator().manual_seed(seed)
            return torch.randn(rows, 5, generator=g, dtype=dtype), torch.randn(rows, 5, generator=g, dtype=dtype)

        return ModelCase(name, toy, (torch.zeros(2, 5, dtype=dtype),), mse, toy_batch,
                         lambda program: toy_split(toy, program.stages))
    if name == "gpt":
        model, example = ex.gpt(layers=4)

        def batch(rows: int, seed: int) -> Batch:
            tokens, targets = ex.lm_batch(128, rows, 16, seed=seed)
            return (tokens,), targets
    elif name == "bert":
        model, example = ex.bert(layers=4, dropout=0.1)

        def batch(rows: int, seed: int) -> Batch:
            tokens, mask, targets = ex.mlm_batch(128, rows, 16, seed=seed)
            return (tokens, mask), targets
    elif name == "hf-gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel  # optional dependency (the hf extra)

        cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=4, n_head=2, resid_pdrop=0.1,
                         embd_pdrop=0.1, attn_pdrop=0.1, use_cache=False, bos_token_id=0, eos_token_id=0)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = GPT2LMHeadModel(cfg)
        example = (ex.lm_batch(96, 2, 12, seed=1)[0],)

        def batch(rows: int, seed: int) -> Batch:
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


def contract_errors(
    case: ModelCase, program: Program, data_parallel: int = 1, steps: int = 3, rows_per_microbatch: int = 2,
    seed: int = 7, rng_seed: int = 0, **pipe_options: object,
) -> dict[str, object]:
    """Run the numerics contract for one (model, program): relative errors of the loss, of every gradient
    this process holds (by FQN) and of the parameters after ``steps`` SGD steps, against the reference; both
    draw random numbers under the rule of runtime.rng with ``rng_seed``.

    Under torch.distributed, this rank's data-parallel shard is its part of the global batch.
    """
    dp_index = dist.get_rank() // program.devices if dist.is_initialized() else 0
    n = program.microbatches
    inputs, targets = case.batches(rows_per_microbatch * n * data_parallel, seed)
    mine = (rows(inputs, data_parallel)[dp_index], rows(targets, data_parallel)[dp_index])
    pipe = CompiledPipeline(case.split_for(program), program, case.loss_fn, case.example_inputs, optimizer=sgd,
                            data_parallel=data_parallel, seed=rng_seed, **pipe_options)
    loss = pipe.forward_backward(*mine)
    grads = pipe.gradients()
    for _ in range(steps):
        pipe.step(*mine)
    ref = reference_run(case.model, case.loss_fn, inputs, targets, n * data_parallel, steps, rng_seed)
    grad_err = max(max_rel_err(g, ref.grads[k]) for k, g in grads.items())
    param_err = max(max_rel_err(p.detach(), ref.params[k]) for k, p in pipe.named_parameters().items())
    return {
        "model": case.name, "schedule": program.name, "devices": program.devices, "dp": data_parallel,
        "loss": loss, "loss_err": abs(loss - ref.loss) / abs(ref.loss), "grad_err": grad_err, "param_err": param_err,
        "fqns": sorted(grads), "all_fqns": sorted(ref.grads),
    }
