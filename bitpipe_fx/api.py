"""``compile()``: model -> captured, partitioned, split, scheduled pipeline; ``CompiledPipeline`` runs it.

With torch.distributed initialised (world size = devices x data_parallel; torchrun's environment is picked
up automatically) each rank keeps only its stages; otherwise one process runs every device (local).
``step(inputs, targets)`` splits the batch into N micro-batches, computes the gradient of the mean loss
(the numerics contract of DESIGN.md), runs the optimizer once and zeroes the gradients.

With data_parallel = k, the k pipelines (rank = dp_index x devices + device) each get their own batch (every
rank of one pipeline passes the same one); the loss and the gradients are the mean over all k x N
micro-batches, as if one model had trained on the concatenated batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bitpipe_fx import export
from bitpipe_fx.arguments import check_compile, check_flag, check_optimizer, check_pipeline
from bitpipe_fx.compiler import agree_on_plan, build_plan, split_from_plan, state_names
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.export import mode_values
from bitpipe_fx.matching import check_cost_options, compile_settings
from bitpipe_fx.passes.stages import Inputs, LossFn, SplitModel, Targets
from bitpipe_fx.plan import DEFAULT_FLOP_RATE, Plan
from bitpipe_fx.recompute import check_mode, with_recompute
from bitpipe_fx.runtime import dcp as checkpoint_dcp
from bitpipe_fx.runtime.batch import BatchSplitter, as_call
from bitpipe_fx.runtime.distributed import DistributedExecutor
from bitpipe_fx.runtime.group import check_world, join_from_env
from bitpipe_fx.runtime.local import LocalExecutor
from bitpipe_fx.runtime.precision import precision_of
from bitpipe_fx.runtime.predict import assemble
from bitpipe_fx.runtime.specs import trace_boundaries
from bitpipe_fx.runtime.state import (
    PipelineState,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
)
from bitpipe_fx.runtime.timeline import write_timeline
from bitpipe_fx.schedules.ir import Program
from bitpipe_fx.schedules.spec import AUTO, parse_bytes
from bitpipe_fx.schedules.validate import validate
from bitpipe_fx.sim.trace import TraceEvent

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
DEFAULT_TIMEOUT = 45.0


class CompiledPipeline:
    """A model cut into stages and scheduled over devices; ``step`` trains it on one batch.

    Attributes: ``plan`` (the Plan, None when built from a split), ``program``, ``optimizer`` (built by the
    factory from this process's parameters), ``distributed``, ``rank``, ``training``, ``last_timeline``, ``seed``,
    ``steps_taken`` (steps so far, skipped ones too; with ``seed`` it keys the random streams, runtime.rng),
    ``on_nonfinite`` and ``skipped_steps`` (steps whose update a non-finite value dropped).
    """

    def __init__(
        self,
        split: SplitModel,
        program: Program,
        loss_fn: LossFn,
        example_inputs: Inputs,
        *,
        optimizer: OptimizerFactory | None = None,
        data_parallel: int = 1,
        plan: Plan | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        trace_path: str | Path | None = None,
        lookahead: int = 4,
        state_names: tuple[list[str], dict[str, str]] | None = None,
        source: nn.Module | None = None,
        seed: int = 0,
        on_nonfinite: str = "raise",
        shard_optimizer: bool = False,
        precision: str = "fp32",
        recompute: tuple[bool, ...] = (),
    ) -> None:
        if program.stages != split.num_stages:
            raise ConfigError(
                f"program {program.name!r} has {program.stages} stages but the split model has {split.num_stages}; "
                "split the model with the plan's partition"
            )
        check_pipeline(loss_fn, optimizer, data_parallel, timeout, seed, on_nonfinite)
        if not isinstance(shard_optimizer, bool):
            raise ConfigError(f"shard_optimizer must be True or False (shard optimizer state over each stage's "
                              f"copies), got {shard_optimizer!r}")
        self.precision = precision_of(precision)
        if recompute and len(recompute) != program.stages:
            raise ConfigError(f"recompute has {len(recompute)} flags but the program has {program.stages} stages; "
                              "give one per stage (or none)")
        validate(program)
        self.recompute = tuple(bool(f) for f in recompute)
        self._unflatten = split.unflatten_output
        self.program, self.plan, self.loss_fn = program, plan, loss_fn
        self.data_parallel, self.timeout, self.trace_path = data_parallel, timeout, trace_path
        args, kwargs = as_call(example_inputs)
        specs = trace_boundaries(split, split.flatten_inputs(args, kwargs), self.precision)
        self._splitter = BatchSplitter(split.input_names, split.flatten_inputs, specs.model_inputs,
                                       program.microbatches, split.index_ranges)
        self.distributed = join_from_env(timeout)
        self.executor: LocalExecutor | DistributedExecutor
        if self.distributed:
            self.executor = DistributedExecutor(program, split, loss_fn, specs, data_parallel, timeout, lookahead,
                                                seed, shard_optimizer, self.precision, self.recompute)
            self.rank = self.executor.rank
        elif shard_optimizer:
            raise ConfigError("shard_optimizer=True shards optimizer state over the processes holding copies of a "
                              "stage, and this pipeline runs in one process: launch devices x data_parallel processes "
                              "(torchrun, bitpipe_fx.runtime.launch, or bitpipe-fx train without --local) or drop it")
        else:
            self.executor = LocalExecutor(program, split, loss_fn, specs, data_parallel, seed, self.precision,
                                          self.recompute)
            self.rank = 0
        self._state_keys, self._canonical = state_names or ([], {})
        self._source = source  # the compiled model: its class and config for a Hugging Face export
        self._zero = self.executor.zero if isinstance(self.executor, DistributedExecutor) else None
        params = self._zero.parameters() if self._zero else [p for r in self.executor.replicas for p in r.trainable]
        self.optimizer = optimizer(params) if optimizer is not None else None
        if optimizer is not None:
            check_optimizer(self.optimizer, params, optimizer)
        self.last_timeline: list[TraceEvent] = []
        self.seed = seed
        self.steps_taken = 0  # steps so far (skipped ones too): the step number that keys the random streams
        self.on_nonfinite, self.skipped_steps = on_nonfinite, 0
        self.train(all(r.module.training for r in self.executor.replicas))

    # ---- steps ----------------------------------------------------------------------------------

    def forward_backward(self, inputs: Inputs, targets: Targets, record: bool = False) -> float:
        """Gradients of the mean micro-batch loss, summed over replicas (see ``gradients()``); returns the loss."""
        check_flag("record", record)
        batch = self._splitter.split(inputs, targets)
        for r in self.executor.replicas:
            r.zero_grad()
        loss = self.executor.run(batch, train=True, record=record, step=self.steps_taken)
        self._after(record)
        return loss

    def step(self, inputs: Inputs, targets: Targets, record: bool = False) -> float:
        """One synchronous training step: forward_backward, optimizer step, zero grads; returns the mean loss.
        A non-finite loss or gradient raises NonFiniteError (``on_nonfinite="raise"``) or drops the update and
        counts it in ``skipped_steps`` (``"skip"``); either way nothing (parameters, buffers) changes."""
        if self.optimizer is None:
            raise ConfigError("step() needs an optimizer: compile(..., optimizer=lambda params: ...); "
                              "use forward_backward() to compute gradients only")
        loss = self.forward_backward(inputs, targets, record)
        finding = self.executor.last_nonfinite
        if finding is not None:  # decided alike on every rank (runtime.nonfinite): no update anywhere
            for r in self.executor.replicas:
                r.zero_grad()
                r.stats.undo()
            if self.on_nonfinite == "raise":
                raise finding.error(self.steps_taken + 1)
            self.skipped_steps += 1
        else:
            self.optimizer.step()
            if self._zero:  # every copy gets the updated shards
                self._zero.gather()
        self.steps_taken += 1
        for r in self.executor.replicas:
            r.zero_grad()
        return loss

    def evaluate(self, inputs: Inputs, targets: Targets) -> float:
        """Forward-only mean loss over the batch (no gradients; the current train/eval mode applies)."""
        return self.executor.run(self._splitter.split(inputs, targets), train=False, record=False,
                                 step=self.steps_taken)

    def predict(self, inputs: Inputs) -> object:
        """Forward only over the batch's micro-batches, stage modules in eval mode (dropout off); returns the
        model's outputs for the whole batch as the unpipelined model would (see runtime.predict), on every rank
        of the pipeline. The weights are those of the pipeline's mode (Schedule-Free: pipe.eval() for x)."""
        batch = self._splitter.split(inputs, None)
        modes = [r.module.training for r in self.executor.replicas]
        for r in self.executor.replicas:
            r.module.train(False)
        try:
            flat = self.executor.predict(batch, self.steps_taken)
        finally:
            for r, mode in zip(self.executor.replicas, modes):
                r.module.train(mode)
        return assemble(flat, self.program.microbatches, self._splitter.rows, self._unflatten)

    def _after(self, record: bool) -> None:
        if not record:
            return
        self.last_timeline = list(self.executor.last_events)
        if self.trace_path is not None and self.rank == 0:
            self.save_timeline(self.trace_path)

    def save_timeline(self, path: str | Path) -> Path:
        """Write the last recorded step as a Chrome trace in the simulator's format (seconds)."""
        meta = {"schedule": self.program.name, "devices": self.program.devices,
                "microbatches": self.program.microbatches, "data_parallel": self.data_parallel}
        return write_timeline(path, self.last_timeline, meta)

    # ---- modes ----------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> CompiledPipeline:
        """Set every stage's train/eval mode, and the optimizer's (Schedule-Free swaps y and x)."""
        self.training = mode
        for r in self.executor.replicas:
            r.module.train(mode)
        swap = getattr(self.optimizer, "train" if mode else "eval", None)
        if callable(swap):
            swap()
            if self._zero:  # the swap moved only the shards (collective, as with every rank calling it)
                self._zero.gather()
        return self

    def eval(self) -> CompiledPipeline:
        return self.train(False)

    # ---- gradients, parameters, state -----------------------------------------------------------

    def _first_copies(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for r in self.executor.replicas:
            for name, p in r.params.items():
                out.setdefault(name, p)
        return out

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """This process's parameters by FQN (one copy each)."""
        return self._first_copies()

    def gradients(self) -> dict[str, torch.Tensor]:
        """This process's gradients by FQN, summed over replicas and tied uses (clones)."""
        if self._zero:
            raise ConfigError("with shard_optimizer=True each rank holds only its shard of the summed gradients; "
                              "compile without shard_optimizer to read whole gradients")
        return {n: p.grad.detach().clone() for n, p in self._first_copies().items() if p.grad is not None}

    def state_dict(self) -> PipelineState:
        """This process's part: {"model": {fqn: tensor}, "optimizer": state by FQN (if any)}."""
        out = PipelineState(model=model_state(self.executor.replicas))
        if self.optimizer is not None:
            out["optimizer"] = (self._zero.optimizer_state(self.optimizer) if self._zero
                                else optimizer_state(self.optimizer, self.executor.replicas))
        return out

    def load_state_dict(self, state: PipelineState) -> None:
        """Load what ``state_dict()`` returned (a full_state_dict()["model"] also works for the model)."""
        if "model" not in state:
            raise ConfigError(f"state dict has keys {sorted(state)[:5]}; expected 'model' (and 'optimizer')")
        model = {self._canonical.get(k, k): v for k, v in state["model"].items()}
        load_model_state(self.executor.replicas, model)
        if self.optimizer is not None and "optimizer" in state:
            load_optimizer_state(self.optimizer, self.executor.replicas, state["optimizer"],
                                 self._zero.pieces if self._zero else None)

    def save_checkpoint(self, path: str | Path, extra: Mapping[str, object] | None = None) -> None:
        """Model and optimizer state by original names as a torch.distributed.checkpoint folder, every rank
        writing its stages in parallel (collective: call it on every rank); ``extra``: objects to keep with it."""
        checkpoint_dcp.save(path, self.executor.replicas, self.optimizer, extra or {}, self._zero)

    def load_checkpoint(self, path: str | Path, extra: tuple[str, ...] = ()) -> dict[str, object]:
        """Load a ``save_checkpoint`` folder, whatever schedule, D or data-parallel size wrote it; returns the
        ``extra`` objects named (those present)."""
        return checkpoint_dcp.load(path, self.executor.replicas, self.optimizer, extra, self._zero)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state_dict (original keys, tied names included) on rank 0; {} elsewhere."""
        return self._gathered(model_state(self.executor.replicas), everywhere=False)

    def _gathered(self, mine: dict[str, torch.Tensor], everywhere: bool) -> dict[str, torch.Tensor]:
        """Every rank's part by original key on rank 0 (on every rank with ``everywhere``); {} elsewhere."""
        if self.distributed:
            parts: list[dict[str, torch.Tensor] | None] = [None] * dist.get_world_size()
            if everywhere:
                dist.all_gather_object(parts, mine)
            else:
                dist.gather_object(mine, parts if self.rank == 0 else None, dst=0)
                if self.rank != 0:
                    return {}
            mine = {}
            for part in parts:
                for k, v in (part or {}).items():
                    mine.setdefault(k, v)
        if not self._state_keys:
            return mine
        return {k: mine[self._canonical[k]] for k in self._state_keys if self._canonical[k] in mine}

    # ---- after training: export, load_into ------------------------------------------------------

    def trained_state_dict(self, weights: str = "eval", everywhere: bool = False) -> dict[str, torch.Tensor]:
        """``full_state_dict()`` with the parameters of mode ``weights`` (Schedule-Free: "eval" = x, "train" = y);
        on rank 0 only unless ``everywhere``. The pipeline and its optimizer are unchanged."""
        mine = model_state(self.executor.replicas)
        mine.update(mode_values(self._first_copies(), self.optimizer, weights, self.training))
        if self._zero:  # Schedule-Free's other mode, from the shards' z (collective)
            mine.update(self._zero.mode_values(self.optimizer, weights))
        return self._gathered(mine, everywhere)

    def export(self, path: str | Path, weights: str = "eval") -> Path | None:
        """Write the trained weights (see ``bitpipe_fx.export``): a safetensors file, or a ``from_pretrained``
        directory for a Hugging Face model. Under torch.distributed rank 0 writes; returns the path there."""
        state = self.trained_state_dict(weights)
        if self.distributed and self.rank != 0:
            return None
        return export.save(path, state, self._source)

    def load_into(self, model: nn.Module, weights: str = "eval") -> nn.Module:
        """Copy the trained weights into ``model`` (every name and shape must match) on every rank; returns it."""
        export.load_strict(model, self.trained_state_dict(weights, everywhere=True))
        return model


def compile(
    model: nn.Module,
    example_inputs: Inputs,
    loss_fn: LossFn,
    schedule: str | None = None,
    devices: int | None = None,
    microbatches: int | None = None,
    optimizer: OptimizerFactory | None = None,
    data_parallel: int = 1,
    plan: Plan | str | Path | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    trace_path: str | Path | None = None,
    leaf_modules: tuple[str | type[nn.Module], ...] = (),
    seed: int = 0,
    on_nonfinite: str = "raise",
    shard_optimizer: bool = False,
    precision: str = "fp32",
    flop_rate: float | None = None,
    profile: bool = False,
    network: Mapping[str, float] | None = None,
    recompute: str | None = None,
    memory_limit: float | str | None = None,
    **schedule_options: object,
) -> CompiledPipeline:
    """Capture, partition, split and schedule ``model``; returns a pipeline that trains it.

    ``example_inputs``: ONE micro-batch (tensor, tuple of args or dict of kwargs); ``schedule``: a spec
    ``NAME[:key=value,...]`` (default bitpipe), D default 4, N default 8; ``plan``: a Plan, or a path to one
    saved by ``bitpipe-fx partition``, to reuse its partition and program (schedule, D and N then come from
    it; a different value given here is refused); ``timeout``: bound in seconds of every wait in a
    distributed step; ``leaf_modules``: submodules (FQNs or classes) that run as one opaque call each;
    ``seed``: keys the random streams (dropout) of every micro-batch with the step number (runtime.rng), so
    results do not depend on the schedule; ``on_nonfinite``: "raise" (NonFiniteError) or "skip" (drop that
    step's update on every rank and count it in ``skipped_steps``); ``shard_optimizer``: ZeRO-1, each rank keeps
    optimizer state only for its shard of every stage it holds (runtime.zero; needs torch.distributed);
    ``precision``: "fp32" or "bf16-mixed" (fp32 master weights, gradients and optimizer state; stages
    computed under bf16 autocast, activations sent in bf16; runtime.precision); ``flop_rate``, ``profile`` and
    ``network`` are build_plan's cost options (what ``bitpipe-fx inspect`` passes), so a generated program and
    ``schedule="auto"``'s ranking are those inspect shows for the same options; with a plan, its own;
    ``recompute``: "none" (default), "full"
    or "auto" (the fewest stages recomputed that fit ``memory_limit``, peak bytes per device such as "12GiB";
    bitpipe_fx.recompute), applied to a given plan too; ``memory_limit`` also bounds ``schedule="auto"``.
    """
    precision_of(precision)  # a wrong value is refused before the model is captured
    check_compile(model, example_inputs, schedule, devices, microbatches, plan, trace_path, leaf_modules)
    check_pipeline(loss_fn, optimizer, data_parallel, timeout, seed, on_nonfinite)
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    if memory_limit is not None and (recompute != "auto" or str(schedule).partition(":")[0].strip() == AUTO):
        schedule_options = {**schedule_options, "memory_limit": memory_limit}  # the bound of schedule="auto"
    spec, devices, microbatches = compile_settings(plan, schedule, devices, microbatches, schedule_options)
    check_cost_options(plan, flop_rate, profile, network)
    distributed = join_from_env(timeout)  # a peer that never joins: an error within the timeout
    if plan is None:
        if distributed:  # before planning, so that a wrong world fails before the model is captured
            check_world(devices, data_parallel)
        options = ({"memory_limit": memory_limit} if recompute == "auto" else {}) | spec.kwargs()
        plan, split = build_plan(model, example_inputs, spec.name, devices, microbatches, leaf_modules=leaf_modules,
                                 flop_rate=DEFAULT_FLOP_RATE if flop_rate is None else flop_rate, profile=profile,
                                 network=network, recompute=check_mode(recompute or "none"), **options)
    else:
        split = split_from_plan(model, example_inputs, plan, leaf_modules=leaf_modules)
        if recompute is not None:
            plan = with_recompute(plan, check_mode(recompute), parse_bytes(memory_limit))
    if distributed:
        plan, split = agree_on_plan(plan, split, model, example_inputs, leaf_modules)
    return CompiledPipeline(
        split, plan.program, loss_fn, example_inputs, optimizer=optimizer, data_parallel=data_parallel, plan=plan,
        timeout=timeout, trace_path=trace_path, state_names=state_names(model), source=model, seed=seed,
        on_nonfinite=on_nonfinite, shard_optimizer=shard_optimizer, precision=precision, recompute=plan.recompute,
    )

