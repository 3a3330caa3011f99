"""`bitpipe-fx simulate`: every schedule on the same work in the event simulator, as one comparison table.

Costs on the command line are per 1/D of the model (one device's share of one model replica); a schedule
that cuts the model into S stages runs each stage at D/S of them (``CostModel.scaled``), so makespans,
activation and weight figures compare like for like across schedules.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path

from bitpipe_fx.errors import BitPipeError, ConfigError, ScheduleError
from bitpipe_fx.schedules import SCHEDULES, Program, generate, validate
from bitpipe_fx.schedules.spec import AUTO, ScheduleSpec, make_spec, parse_bytes, parse_spec, split_specs
from bitpipe_fx.sim import auto
from bitpipe_fx.sim.cost import CostModel
from bitpipe_fx.sim.engine import simulate
from bitpipe_fx.sim.report import SimReport
from bitpipe_fx.sim.trace import write_chrome_trace

REFERENCE = "1f1b"


@dataclass(frozen=True)
class Outcome:
    """One schedule's result: a report, or the reason it was rejected for this (D, N)."""

    label: str
    report: SimReport | None
    reason: str = ""


def parse_costs(text: str) -> dict[str, float]:
    """``F=1,B=2[,W=0.5]`` -> {"F": 1.0, "B": 2.0, "W": 0.5}; W is the weight-gradient part of B (time)."""
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().upper()
        if not sep or key not in ("F", "B", "W"):
            raise ConfigError(f"cannot read cost {item!r}; write F=<forward>,B=<backward>[,W=<weight part of B>]")
        try:
            out[key] = float(value)
        except ValueError as exc:
            raise ConfigError(f"cost {key}={value!r} is not a number") from exc
    return out


def cost_model(costs: dict[str, float], **comm) -> CostModel:
    """CostModel per 1/D of the model from parsed ``--costs`` and communication settings."""
    forward, backward = costs.get("F", 1.0), costs.get("B", 2.0)
    weight = costs.get("W", backward * 0.5)
    if not 0 <= weight <= backward:
        raise ConfigError(f"W={weight} must lie between 0 and B={backward} (W is the weight-gradient part of B)")
    fraction = weight / backward if backward > 0 else 0.5
    return CostModel(forward=forward, backward=backward, weight_fraction=fraction, **comm)


def run_one(spec: ScheduleSpec, devices: int, microbatches: int, cost: CostModel) -> Outcome:
    """Generate, validate and simulate one (checked) schedule spec; a schedule that refuses this (D, N)
    becomes an Outcome with its reason."""
    try:
        program = generate(spec.name, devices, microbatches, **spec.kwargs())
        validate(program, execute=False)
        return Outcome(str(spec), _simulate(program, cost.scaled(devices / program.stages)))
    except BitPipeError as exc:
        return Outcome(str(spec), None, str(exc))


def _simulate(program: Program, cost: CostModel) -> SimReport:
    """The simulated step of a structurally valid program; a replay that fails is explained by ``validate``."""
    try:
        return simulate(program, cost)
    except ScheduleError:
        validate(program)  # raises the marked grid of what deadlocks
        raise


def compare(specs: list[ScheduleSpec], devices: int, microbatches: int, cost: CostModel) -> list[Outcome]:
    """Every schedule in ``specs`` on the same work (costs per 1/D of the model).

    The cyclic garbage collector is paused meanwhile: generation and replay make hundreds of thousands of
    small acyclic tuples, freed by reference counting, that it would otherwise rescan many times over.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return [run_one(spec, devices, microbatches, cost) for spec in specs]
    finally:
        gc.freeze()  # what survives leaves the young generation, which the next collection would scan in full
        gc.unfreeze()
        if enabled:
            gc.enable()


def _fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def format_table(outcomes: list[Outcome], reference: Outcome | None) -> str:
    """Markdown table; activation and weight columns in units of 1/D of the model."""
    head = ["schedule", "S", "makespan", f"thpt vs {REFERENCE}", "bubble/makespan", "bubble/ideal",
            "peak act (x1/D)", "weights (x1/D)", "x-dev msgs", "local", "exposed AR"]
    rows = [head, ["---"] * len(head)]
    ref = reference.report.makespan if reference and reference.report else None
    rejected = []
    for o in outcomes:
        r = o.report
        if r is None:
            rejected.append(f"- {o.label}: rejected: {o.reason}")
            continue
        share = r.devices / r.stages
        rows.append([
            o.label, str(r.stages), _fmt(r.makespan), f"{ref / r.makespan:.2f}x" if ref and r.makespan else "-",
            f"{100 * r.bubble_ratio:.1f}%", f"{100 * r.bubble_over_ideal:.1f}%",
            _fmt(max(r.peak_activation_units) * share), _fmt(max(r.weight_chunks) * share),
            str(r.messages_cross), str(r.local_handoffs), _fmt(r.exposed_allreduce),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines + rejected)


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """Register `bitpipe-fx simulate` and its arguments."""
    p = subparsers.add_parser(name, help=help, description=__doc__)
    p.add_argument("--devices", "-d", type=int, default=8, help="pipeline devices D")
    p.add_argument("--microbatches", "-n", type=int, default=16, help="micro-batches N per step")
    p.add_argument("--schedules", "--schedule", default=None,
                   help="comma-separated specs NAME[:key=value,...], e.g. gpipe,interleaved:chunks=2, or "
                        "auto[:memory_limit=BYTES] to rank what schedule='auto' searches (default: every "
                        "registered schedule)")
    p.add_argument("--memory-limit", default=None,
                   help="with auto: peak bytes per device (12GiB); weights count STATE_COPIES times")
    p.add_argument("--costs", default="F=1,B=2", help="F, B and optional W (weight part of B) per 1/D of the model")
    p.add_argument("--activation-bytes", type=float, default=0.0, help="bytes of one stage boundary per micro-batch")
    p.add_argument("--param-bytes", type=float, default=0.0, help="parameter bytes of 1/D of the model")
    p.add_argument("--p2p-latency", type=float, default=0.0, help="time units per message")
    p.add_argument("--p2p-bandwidth", type=float, default=math.inf, help="bytes per time unit")
    p.add_argument("--allreduce-latency", type=float, default=0.0, help="alpha, time units")
    p.add_argument("--allreduce-bandwidth", type=float, default=math.inf, help="beta, bytes per time unit")
    p.add_argument("--data-parallel", type=int, default=1, help="data-parallel degree (all-reduce group factor)")
    p.add_argument("--png", type=Path, help="Gantt chart of every simulated schedule, stacked")
    p.add_argument("--trace", type=Path, help="Chrome trace (one file per schedule when several: NAME inserted)")
    p.add_argument("--json", type=Path, help="summary rows as JSON")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    """Run the comparison, print the table, write the optional PNG / traces / JSON."""
    cost = cost_model(
        parse_costs(args.costs), activation_bytes=args.activation_bytes, param_bytes=args.param_bytes,
        p2p_latency=args.p2p_latency, p2p_bandwidth=args.p2p_bandwidth, allreduce_latency=args.allreduce_latency,
        allreduce_bandwidth=args.allreduce_bandwidth, data_parallel=args.data_parallel,
    )
    # every spec is checked before anything runs: a typo is an error (exit 2), not a rejected row
    specs = [parse_spec(s) for s in split_specs(args.schedules)] if args.schedules else list(map(make_spec, SCHEDULES))
    if not specs:
        raise ConfigError(f"no schedules to compare; choose from {sorted(SCHEDULES)}")
    autos = [s for s in specs if s.name == AUTO]
    if len(autos) > 1 or (args.memory_limit is not None and not autos):
        raise ConfigError("name auto once, and give --memory-limit only with it (e.g. --schedule auto "
                          f"--memory-limit 12GiB); got {args.schedules!r}")
    if args.memory_limit is not None:
        parse_bytes(args.memory_limit)  # a bad size is refused before anything runs
    outcomes = compare([s for s in specs if s.name != AUTO], args.devices, args.microbatches, cost)
    choice = None
    if autos:
        known = {o.label: o for o in outcomes}

        def simulate_one(spec: ScheduleSpec) -> SimReport | None:
            if str(spec) not in known:
                known[str(spec)] = compare([spec], args.devices, args.microbatches, cost)[0]
            return known[str(spec)].report

        choice = auto.search(autos[0], args.devices, args.microbatches, args.memory_limit, simulate_one)
        outcomes.insert(specs.index(autos[0]), Outcome(f"{autos[0]} -> {choice.spec}", choice.report))
    reference = next((o for o in outcomes if o.label == REFERENCE), None)
    if reference is None and REFERENCE in SCHEDULES:
        reference = run_one(make_spec(REFERENCE), args.devices, args.microbatches, cost)
    w = cost.backward * cost.weight_fraction
    print(f"D={args.devices} devices, N={args.microbatches} micro-batches; per 1/D of the model: "
          f"F={_fmt(cost.forward)} B={_fmt(cost.backward)} (I={_fmt(cost.backward - w)} W={_fmt(w)}); "
          f"p2p {_fmt(cost.p2p_latency)} + bytes/{_fmt(cost.p2p_bandwidth)}; "
          f"all-reduce {_fmt(cost.allreduce_latency)} + 2(n-1)/n bytes/{_fmt(cost.allreduce_bandwidth)}, "
          f"dp={cost.data_parallel}")
    print(format_table(outcomes, reference))
    if choice is not None:
        print("\n".join(["", *choice.search.table()]))
    done = [o for o in outcomes if o.report is not None]
    if args.png and done:
        from bitpipe_fx.sim.plot import gantt_panels

        titles = [f"{o.label}: makespan {_fmt(o.report.makespan)}, bubble {100 * o.report.bubble_ratio:.1f}%"
                  for o in done]
        print(f"wrote {gantt_panels(list(zip(titles, [o.report for o in done])), args.png)}")
    if args.trace:
        for o in done:
            path = args.trace if len(done) == 1 else args.trace.with_name(
                f"{args.trace.stem}.{o.label.replace(':', '_')}{args.trace.suffix}")
            write_chrome_trace(path, o.report.events, metadata={"schedule": o.label})
            print(f"wrote {path}")
    if args.json:
        rows = [{**o.report.summary_row(), "schedule": o.label} if o.report else {"schedule": o.label,
                                                                                 "rejected": o.reason}
                for o in outcomes]
        args.json.write_text(json.dumps({"devices": args.devices, "microbatches": args.microbatches,
                                         "costs_per_device_share": {"F": cost.forward, "B": cost.backward, "W": w},
                                         "rows": rows, "auto": None if choice is None else choice.search.to_dict()},
                                        indent=1))
        print(f"wrote {args.json}")
    return 0
