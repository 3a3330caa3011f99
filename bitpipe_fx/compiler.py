"""The compile driver: capture -> cost -> partition -> split -> schedule, giving a Plan and the split model.

``build_plan`` runs the passes for one schedule; ``inspect`` returns just the plan; ``split_from_plan``
re-cuts a model at a saved plan's cut points, refusing a plan made for a different graph (``graph_hash``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace

import torch.distributed as dist
from torch import nn

from bitpipe_fx.autotune import autotune
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.matching import model_origin, origin_difference
from bitpipe_fx.passes import capture, estimate_costs, split
from bitpipe_fx.passes.capture import normalize_inputs, tied_names
from bitpipe_fx.passes.cost import CostTable
from bitpipe_fx.passes.profile import measure_stages
from bitpipe_fx.passes.stages import Inputs, SplitModel
from bitpipe_fx.plan import DEFAULT_FLOP_RATE, Plan
from bitpipe_fx.planning import base_plan, best_partition, check_network, cut, with_costs
from bitpipe_fx.recompute import check_mode, with_recompute
from bitpipe_fx.schedules.spec import AUTO, parse_bytes, schedule_spec


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
    network: Mapping[str, float] | None = None,
    memory_limit: float | str | None = None,
    recompute: str = "none",
    **schedule_options: object,
) -> tuple[Plan, SplitModel]:
    """Capture, cost, partition, schedule and split ``model`` for ``schedule``; returns (Plan, SplitModel).

    ``example_inputs``: one micro-batch, as a tensor, a tuple of positional args or a dict of keyword args.
    ``microbatches`` defaults to 2 x devices. The program is generated with the partition's own cost model
    (``network``: CostModel link fields such as ``p2p_bandwidth`` in bytes/s; default free links), and of the
    partitions at ``balance_tolerance`` and 0 the one whose program simulates fastest is kept.
    ``schedule="auto"`` searches every family and option (bitpipe_fx.autotune) under ``memory_limit``.
    ``recompute``: "none", "full" or "auto" (the fewest recomputed stages that fit ``memory_limit``;
    bitpipe_fx.recompute), searched together with the schedule under ``schedule="auto"``.
    ``profile=True`` measures each stage's forward and backward time, re-balances once with the measured
    times, regenerates the program with them and stores them (not reproducible across ranks: save the plan
    and load it everywhere). Extra keyword arguments go to the schedule generator.
    """
    if flop_rate <= 0:
        raise ConfigError(f"flop_rate must be > 0 FLOP/s, got {flop_rate}")
    n = 2 * devices if microbatches is None else microbatches
    check_mode(recompute)
    spec = schedule_spec(schedule, schedule_options)
    links = check_network(network)
    args, kwargs = normalize_inputs(example_inputs)
    captured = capture(model, args, kwargs, leaf_modules=leaf_modules)
    costs = estimate_costs(captured)
    fields_ = {"graph_hash": graph_hash(costs), "model": type(model).__name__, "flop_rate": float(flop_rate),
               "origin": model_origin(model, example_inputs), "network": links}
    if spec.name == AUTO:
        limit = spec.kwargs().get("memory_limit", memory_limit)
        plan = autotune(costs, devices, n, fields_, memory_limit=limit, balance_tolerance=balance_tolerance,
                        recompute=recompute)
    else:
        if memory_limit is not None and recompute != "auto":
            raise ConfigError(f"memory_limit={memory_limit!r} applies to schedule='auto' or recompute='auto' only; "
                              f"got schedule {str(spec)!r} with recompute={recompute!r}: use one of them or drop "
                              "memory_limit")
        base = base_plan(spec, devices, n, fields_)
        plan = best_partition(base, costs, (balance_tolerance, 0.0))[0]
    stage_model = split(captured, plan.cuts)
    if profile:
        fwd, bwd = measure_stages(stage_model, captured.example_inputs)
        rows = costs.stages(plan.cuts)
        bounds = (0, *plan.cuts, len(costs.nodes))
        weights = [
            node.flops * (fwd[k] + bwd[k]) / max(rows[k].flops, 1)
            for k in range(len(rows))
            for node in costs.nodes[bounds[k] : bounds[k + 1]]
        ]
        part = cut(costs, plan.program, balance_tolerance, weights=weights)
        stage_model = split(captured, part)
        fwd, bwd = measure_stages(stage_model, captured.example_inputs)
        plan = with_costs(replace(plan, forward_times=fwd, backward_times=bwd), costs, part)
    if spec.name != AUTO:  # after profiling: the choice is for the stages that will run, at their measured times
        plan = with_recompute(plan, recompute, parse_bytes(memory_limit))
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


def state_names(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The model's state_dict keys in order, and key -> canonical FQN (first name of a tied tensor)."""
    canonical, _ = tied_names(model)
    keys = list(model.state_dict().keys())
    return keys, {k: canonical.get(k, k) for k in keys}


def agree_on_plan(plan: Plan, split: SplitModel, model: nn.Module, example_inputs: Inputs,
                  leaf_modules: tuple[str | type[nn.Module], ...]) -> tuple[Plan, SplitModel]:
    """Every rank uses rank 0's plan (a measured cost model could differ between ranks); collective."""
    box = [plan.to_json() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] == plan.to_json():
        return plan, split
    agreed = Plan.from_json(box[0])
    return agreed, split_from_plan(model, example_inputs, agreed, leaf_modules=leaf_modules)
