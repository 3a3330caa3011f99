"""How well the simulator predicts a real run: measured bubble (recorded timeline) vs simulated bubble.

For every schedule family, ``build_plan`` cuts the examples' GPT-style model (FLOP-balanced, so every rank
computes the same cut), ``measure_stages`` (the passes' profiler) times each stage's forward and backward on
both ranks at once (the mean is used), and the same processes measure gloo's p2p latency/bandwidth and
all-reduce alpha/beta. ``compile(..., plan=plan)`` then runs steps with ``record=True``; the recorded
timeline gives the measured step time and bubble (mean over devices of idle / step, idle = step - compute).

Two predictions per schedule:
- predicted: ``simulate(plan.program, plan.cost_model(forward=<measured>, backward=<measured>, <comm>))``,
  what the simulator says before the step runs (W = B/2 for schedules that split the backward);
- replayed: the simulator fed the median F/B/I/W durations of the recorded step itself, which isolates the
  simulator's model of the schedule (dependencies, messages, syncs) from errors in the measured costs.

    python benchmarks/prediction.py           # ~3-5 min on 2 CPU cores
    python benchmarks/prediction.py --smoke   # tiny model, two schedules
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from _common import Column, machine_info, machine_line, markdown_table, parser, write_results

from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from bitpipe_fx.plan import Plan
from bitpipe_fx.runtime.launch import launch
from bitpipe_fx.runtime.timeline import write_timeline
from bitpipe_fx.schedules import Program
from bitpipe_fx.sim import CostModel, TraceEvent, simulate, write_chrome_trace

FAMILIES = ("gpipe", "1f1b", "interleaved", "zbv", "dualpipev", "chimera", "bitpipe-paper", "bitpipe")
COMPUTE = ("F", "B", "I", "W")
COMM_KEYS = ("p2p_latency", "p2p_bandwidth", "allreduce_latency", "allreduce_bandwidth")
FULL = {"model": {"vocab": 2048, "seq": 128, "dim": 256, "heads": 4, "layers": 8, "micro_batch": 3},
        "microbatches": 8, "warmup": 1, "records": 5, "schedules": FAMILIES}
SMOKE = {"model": {"vocab": 64, "seq": 16, "dim": 32, "heads": 2, "layers": 4, "micro_batch": 1},
         "microbatches": 4, "warmup": 1, "records": 1, "schedules": ("1f1b", "bitpipe")}


# ---- in the launched ranks -----------------------------------------------------------------------


def _timed(fn: Any, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up, ranks aligned by a barrier."""
    times = []
    for i in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_comm(message_bytes: int, reduce_bytes: int, repeats: int = 10) -> dict[str, float]:
    """gloo costs between ranks 0 and 1: p2p latency and bandwidth (ping-pong), all-reduce alpha and beta.

    Bandwidths come from messages of the given sizes (at least 1 MiB, so that latency does not swamp them).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    peer = 1 - rank if rank < 2 else None

    def ping_pong(t: torch.Tensor) -> None:
        if peer is None:
            return
        if rank == 0:
            dist.send(t, peer)
            dist.recv(t, peer)
        else:
            dist.recv(t, peer)
            dist.send(t, peer)

    small, big = torch.zeros(1), torch.zeros(max(message_bytes, 1 << 20) // 4)
    latency = _timed(lambda: ping_pong(small), repeats) / 2
    one_way = _timed(lambda: ping_pong(big), repeats) / 2
    bandwidth = big.numel() * 4 / max(one_way - latency, 1e-9)
    r_small, r_big = torch.zeros(1), torch.zeros(max(reduce_bytes, 1 << 20) // 4)
    alpha = _timed(lambda: dist.all_reduce(r_small), repeats)
    t_big = _timed(lambda: dist.all_reduce(r_big), repeats)
    beta = 2 * (world - 1) / world * r_big.numel() * 4 / max(t_big - alpha, 1e-9)
    return {"p2p_latency": latency, "p2p_bandwidth": bandwidth, "allreduce_latency": alpha,
            "allreduce_bandwidth": beta, "message_bytes": float(big.numel() * 4),
            "reduce_bytes": float(r_big.numel() * 4)}


def run_ranks(cfg: dict[str, Any], microbatches: int, warmup: int, records: int, schedules: tuple[str, ...]
              ) -> dict[str, Any]:
    """One rank: measure comm costs, then per schedule plan, time each stage, compile and record steps."""
    import bitpipe_fx as bp
    from bitpipe_fx.compiler import build_plan
    from bitpipe_fx.passes.profile import measure_stages

    rank, world = dist.get_rank(), dist.get_world_size()
    tokens, targets = lm_batch(cfg["vocab"], microbatches * cfg["micro_batch"], cfg["seq"], seed=1234)
    model, _ = gpt(**cfg)
    params = sum(p.numel() for p in model.parameters())
    comm = measure_comm(cfg["micro_batch"] * cfg["seq"] * cfg["dim"] * 4, params * 4 // 4)
    out: dict[str, Any] = {"comm": comm, "schedules": {}}
    for name in schedules:
        model, example = gpt(**cfg)
        plan, split = build_plan(model, example, name, world, microbatches)  # FLOP-balanced: same cut on every rank
        fwd, bwd = measure_stages(split, split.flatten_inputs(example, {}), repeats=5)
        times = torch.tensor([fwd, bwd], dtype=torch.float64)
        dist.all_reduce(times)  # both ranks measured at once, as they compute in the run; use the mean
        times /= world
        pipe = bp.compile(model, example, lm_loss, schedule=name, devices=world, microbatches=microbatches,
                          plan=plan)
        for _ in range(warmup):
            pipe.forward_backward(tokens, targets)
        timelines, walls = [], []
        for _ in range(records):
            dist.barrier()
            start = time.perf_counter()
            pipe.forward_backward(tokens, targets, record=True)
            walls.append(time.perf_counter() - start)
            timelines.append(list(pipe.last_timeline))
        out["schedules"][name] = {"plan": plan.to_json(), "forward": times[0].tolist(), "backward": times[1].tolist(),
                                  "timelines": timelines, "walls": walls}
    return out if rank == 0 else {}


# ---- in the parent -------------------------------------------------------------------------------


def timeline_stats(events: list[TraceEvent], devices: int) -> dict[str, Any]:
    """Step time (from the common start to the last event's end), compute time per device and per kind, bubble."""
    makespan = max(e.end for e in events)
    busy = [0.0] * devices
    by_kind = dict.fromkeys(COMPUTE, 0.0)
    for e in events:
        if e.kind in COMPUTE:
            busy[e.device] += e.end - e.start
            by_kind[e.kind] += e.end - e.start
    bubble = sum(makespan - b for b in busy) / (devices * makespan)
    return {"makespan": makespan, "bubble": bubble, "busy": busy, "by_kind": by_kind}


def measured_costs(result: dict[str, Any], comm: dict[str, float]) -> CostModel:
    """The plan's cost model with the stage times measured before the run and the measured comm costs."""
    plan = Plan.from_json(result["plan"])
    return plan.cost_model(forward=tuple(result["forward"]), backward=tuple(result["backward"]),
                           **{k: comm[k] for k in COMM_KEYS})


def replay_costs(events: list[TraceEvent], program: Program, comm: dict[str, float], base: CostModel) -> CostModel:
    """The simulator's costs from a recorded run: median F, B (or I + W) per stage; W's share of I + W."""
    durations: dict[tuple[str, int], list[float]] = defaultdict(list)
    for e in events:
        if e.kind in COMPUTE:
            durations[(e.kind, e.stage)].append(e.end - e.start)

    def med(kind: str, stage: int) -> float:
        values = durations.get((kind, stage))
        return statistics.median(values) if values else 0.0

    stages = range(program.stages)
    forward = tuple(med("F", s) for s in stages)
    if program.split_backward:
        inputs, weights = [med("I", s) for s in stages], [med("W", s) for s in stages]
        backward = tuple(i + w for i, w in zip(inputs, weights))
        fraction = sum(weights) / sum(backward) if sum(backward) else 0.5
    else:
        backward, fraction = tuple(med("B", s) for s in stages), base.weight_fraction
    return CostModel(forward=forward, backward=backward, weight_fraction=fraction,
                     activation_bytes=base.activation_bytes, param_bytes=base.param_bytes,
                     **{k: comm[k] for k in COMM_KEYS})


def evaluate(name: str, result: dict[str, Any], comm: dict[str, float]) -> dict[str, Any]:
    """Measured vs predicted vs replayed step time and bubble of one schedule."""
    plan = Plan.from_json(result["plan"])
    program = plan.program
    costs = measured_costs(result, comm)
    measured = [timeline_stats(t, program.devices) for t in result["timelines"]]
    quietest = min(range(len(measured)), key=lambda i: measured[i]["makespan"])
    best = measured[quietest]
    predicted = simulate(program, costs)
    replay = simulate(program, replay_costs(result["timelines"][quietest], program, comm, costs))
    m_step, m_bubble = best["makespan"], best["bubble"]
    r_step, r_bubble = replay.makespan, replay.bubble_ratio
    return {
        "schedule": name,
        "stages": program.stages,
        "measured_wall_s": result["walls"][quietest],
        "measured_step_s": m_step,
        "measured_bubble": m_bubble,
        "measured_imbalance": max(best["busy"]) / (sum(best["busy"]) / len(best["busy"])),
        "measured_compute_s": best["by_kind"],
        "backward_over_forward": (best["by_kind"]["B"] + best["by_kind"]["I"] + best["by_kind"]["W"])
        / best["by_kind"]["F"],
        "all_measured_steps_s": [s["makespan"] for s in measured],
        "all_measured_bubbles": [s["bubble"] for s in measured],
        "predicted_step_s": predicted.makespan,
        "predicted_bubble": predicted.bubble_ratio,
        "predicted_bubble_error": predicted.bubble_ratio - m_bubble,
        "predicted_step_error": predicted.makespan / m_step - 1.0,
        "replayed_step_s": r_step,
        "replayed_bubble": r_bubble,
        "replayed_bubble_error": r_bubble - m_bubble,
        "replayed_step_error": r_step / m_step - 1.0,
        "stage_forward_s": result["forward"],
        "stage_backward_s": result["backward"],
    }


def write_traces(folder: Path, result: dict[str, Any]) -> None:
    """``<schedule>.measured.json`` and ``<schedule>.predicted.json`` Chrome traces (open in Perfetto)."""
    folder.mkdir(parents=True, exist_ok=True)
    comm = result["comm"]
    for name, res in result["schedules"].items():
        plan = Plan.from_json(res["plan"])
        costs = measured_costs(res, comm)
        write_timeline(folder / f"{name}.measured.json", res["timelines"][0], {"schedule": name})
        write_chrome_trace(folder / f"{name}.predicted.json", simulate(plan.program, costs).events, unit_us=1e6,
                           metadata={"schedule": name, "predicted": True})


def render(payload: dict[str, Any]) -> str:
    cfg, comm, rows = payload["config"], payload["comm"], payload["rows"]
    model = cfg["model"]
    abs_pred = [abs(r["predicted_bubble_error"]) for r in rows]
    abs_rep = [abs(r["replayed_bubble_error"]) for r in rows]
    return "\n".join([
        "## Simulator prediction vs measured run",
        "",
        machine_line(payload["machine"]),
        "",
        f"GPT-style example model ({model['layers']} layers, dim {model['dim']}, seq {model['seq']}, vocab "
        f"{model['vocab']}), {cfg['microbatches']} micro-batches x {model['micro_batch']} sequences, "
        f"{payload['procs']} gloo processes with 1 thread each; the fastest of {cfg['records']} recorded steps per "
        f"schedule after {cfg['warmup']} warm-up (on a shared machine, the step least disturbed by other jobs; "
        "every step's figures are in the JSON). Measured comm costs: p2p latency "
        f"{comm['p2p_latency'] * 1e6:.0f} us, bandwidth {comm['p2p_bandwidth'] / 1e9:.2f} GB/s; all-reduce alpha "
        f"{comm['allreduce_latency'] * 1e6:.0f} us, beta {comm['allreduce_bandwidth'] / 1e9:.2f} GB/s. Bubble = "
        "mean over devices of (step - compute time) / step. Predicted = stage times measured before the run in the "
        "simulator; replayed = the recorded run's own median F/B/I/W durations in the simulator. Busy max/mean = "
        "the busiest device's compute time over the mean: the simulator's costs are per stage, so a device "
        "that computes slower than its peer for the same work (a shared CPU core) is bubble it cannot "
        "predict. Bwd/fwd = measured backward compute (B, or I + W) over forward compute: the predicted "
        "costs assume I + W = B. Errors: bubble in percentage points (predicted - measured), step time relative.",
        "",
        f"Mean |bubble error|: predicted {100 * statistics.mean(abs_pred):.1f} pp, replayed "
        f"{100 * statistics.mean(abs_rep):.1f} pp.",
        "",
        markdown_table([{**r, **{k: 100 * r[k] for k in r if "bubble" in k}} for r in rows], [
            Column("schedule", "schedule"), Column("stages", "S"),
            Column("measured_step_s", "measured step s", ".3f"), Column("measured_bubble", "measured bubble %", ".1f"),
            Column("measured_imbalance", "busy max/mean", ".2f"),
            Column("backward_over_forward", "bwd/fwd", ".2f"),
            Column("predicted_step_s", "predicted step s", ".3f"),
            Column("predicted_bubble", "predicted bubble %", ".1f"),
            Column("predicted_bubble_error", "error pp", "+.1f"),
            Column("predicted_step_error", "step error", "+.1%"),
            Column("replayed_bubble", "replayed bubble %", ".1f"),
            Column("replayed_bubble_error", "error pp", "+.1f"),
            Column("replayed_step_error", "step error", "+.1%"),
        ]),
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2, help="pipeline processes (devices); bitpipe needs an even number")
    p.add_argument("--schedules", default=None, help="comma-separated schedule names (default: every family)")
    p.add_argument("--traces", type=Path, default=None,
                   help="folder for a Chrome trace of each schedule's first recorded step, measured and simulated")
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.schedules:
        cfg["schedules"] = tuple(args.schedules.split(","))
    started = time.perf_counter()
    info = machine_info()
    (result, *_) = launch(run_ranks, args.procs, "gloo", timeout=300.0, threads=1,
                          args=(cfg["model"], cfg["microbatches"], cfg["warmup"], cfg["records"], cfg["schedules"]))
    rows = [evaluate(name, result["schedules"][name], result["comm"]) for name in cfg["schedules"]]
    for r in rows:
        print(f"{r['schedule']:14s} measured bubble {r['measured_bubble']:.3f} predicted {r['predicted_bubble']:.3f}"
              f" replayed {r['replayed_bubble']:.3f}", flush=True)
    payload = {
        "benchmark": "prediction",
        "smoke": args.smoke,
        "machine": info,
        "procs": args.procs,
        "config": cfg,
        "comm": result["comm"],
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    if args.traces is not None:
        write_traces(args.traces, result)
    json_path, md_path = write_results(args.out, "prediction", payload, render(payload))
    print(f"wrote {json_path} and {md_path} in {payload['seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
