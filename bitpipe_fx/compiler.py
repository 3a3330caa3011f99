"""The compile driver: capture -> cost -> partition -> split -> schedule, giving a Plan and the split model.

``build_plan`` runs the passes for one schedule; ``inspect`` returns just the plan; ``split_from_plan``
re-cuts a model at a saved plan's cut points, refusing a plan made for a different graph (``graph_hash``).
"""

from __future__ import annotations

import hashlib

from torch import nn

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.matching import model_origin, origin_difference
from bitpipe_fx.passes import capture, estimate_costs, partition, split
from bitpipe_fx.passes.capture import normalize_inputs
from bitpipe_fx.passes.cost import CostTable
from bitpipe_fx.passes.profile import measure_stages
from bitpipe_fx.passes.stages import Inputs, SplitModel
from bitpipe_fx.plan import DEFAULT_FLOP_RATE, Plan
from bitpipe_fx.schedules import generate
from bitpipe_fx.schedules.spec import schedule_spec


def graph_hash(costs: CostTable) -> str:
    """Fingerprint of a captured graph: node names, ops and output sizes in order."""
    text = "|".join(f"{n.name}:{n.target}:{n.out_bytes}:{','.join(n.state)}" for n in costs.nodes)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_plan(
    model: nn.Module,
    example_inputs: Inputs,
    schedule: str = "bitpipe",
    devices: int = 4,
    microbatches: int | None = None,
    *,
    flop_rate: float = DEFAULT_FLOP_RATE,
    profile: bool = False,
    balance_tolerance: float = 0.02,
    leaf_modules: tuple[str | type[nn.Module], ...] = (),
    **schedule_options: object,
) -> tuple[Plan, SplitModel]:
    """Capture, cost, partition and split ``model`` for ``schedule``; returns (Plan, SplitModel).

    ``example_inputs``: one micro-batch, as a tensor, a tuple of positional args or a dict of keyword args.
    ``microbatches`` defaults to 2 x devices. ``profile=True`` measures each stage's forward and backward
    time, re-balances once with the measured times, and stores the measurements (not reproducible across
    ranks: save the plan and load it everywhere). Extra keyword arguments go to the schedule generator.
    """
    if flop_rate <= 0:
        raise ConfigError(f"flop_rate must be > 0 FLOP/s, got {flop_rate}")
    n = 2 * devices if microbatches is None else microbatches
    spec = schedule_spec(schedule, schedule_options)
    program = generate(spec.name, devices, n, **spec.kwargs())
    args, kwargs = normalize_inputs(example_inputs)
    captured = capture(model, args, kwargs, leaf_modules=leaf_modules)
    costs = estimate_costs(captured)
    per_pipe = [program.pipe_of.count(p) for p in range(program.pipes)]
    part = partition(costs, program.placement, pipe_microbatches=per_pipe, balance_tolerance=balance_tolerance)
    stage_model = split(captured, part)
    times: tuple[tuple[float, ...], tuple[float, ...]] | tuple[None, None] = (None, None)
    if profile:
        fwd, bwd = measure_stages(stage_model, captured.example_inputs)
        rows = costs.stages(part.cuts)
        bounds = (0, *part.cuts, len(costs.nodes))
        weights = [
            node.flops * (fwd[k] + bwd[k]) / max(rows[k].flops, 1)
            for k in range(len(rows))
            for node in costs.nodes[bounds[k] : bounds[k + 1]]
        ]
        part = partition(
            costs, program.placement, pipe_microbatches=per_pipe, weights=weights, balance_tolerance=balance_tolerance
        )
        stage_model = split(captured, part)
        times = measure_stages(stage_model, captured.example_inputs)
    plan = Plan(
        schedule=spec.name,
        devices=devices,
        microbatches=n,
        program=program,
        cuts=part.cuts,
        stages=costs.stages(part.cuts),
        graph_hash=graph_hash(costs),
        model=type(model).__name__,
        flop_rate=float(flop_rate),
        forward_times=times[0],
        backward_times=times[1],
        schedule_options=spec.kwargs(),
        origin=model_origin(model, example_inputs),
    )
    return plan, stage_model


def inspect(
    model: nn.Module, example_inputs: Inputs, schedule: str = "bitpipe", devices: int = 4,
    microbatches: int | None = None, **options: object,
) -> Plan:
    """The plan ``build_plan`` would make (print it, or call ``.summary()``)."""
    return build_plan(model, example_inputs, schedule, devices, microbatches, **options)[0]


def split_from_plan(model: nn.Module, example_inputs: Inputs, plan: Plan, *,
                    leaf_modules: tuple[str | type[nn.Module], ...] = ()) -> SplitModel:
    """Cut ``model`` at ``plan``'s cut points; ConfigError if the model's graph is not the one planned."""
    args, kwargs = normalize_inputs(example_inputs)
    captured = capture(model, args, kwargs, leaf_modules=leaf_modules)
    costs = estimate_costs(captured)
    found = graph_hash(costs)
    if found != plan.graph_hash:
        raise ConfigError(
            f"the plan was made for a different graph (plan {plan.graph_hash}, this model and micro-batch give "
            f"{found}): {origin_difference(plan.origin, model_origin(model, example_inputs))}; build the model "
            "and micro-batch the plan was made for, or re-run `bitpipe-fx partition` for this one"
        )
    return split(captured, plan.cuts)
