"""Peak memory per device: measured against the memory model's prediction, with and without recomputation.

The examples' 8-layer GPT at D = 4, N = 8, float32, Schedule-Free AdamW, every family with ``recompute="none"``
and ``"full"``. Measured on CPU in one process (the local executor, every device's replicas in it): parameters,
gradient buffers and optimizer state by the bytes of each device's tensors, and activations as the largest
number of bytes alive at once on each device during a step: the tensors autograd saves (counted through
``torch.autograd.graph.saved_tensors_hooks``, from pack until the graph frees them) and the tensors the runtime
keeps between actions (received inputs, outputs awaiting their backward, a recomputed stage's inputs, the
gradients an I keeps for its W), each storage once per device. The prediction is ``Plan.memory()``
(bitpipe_fx/sim/memory.py) without its communication buffers: the local executor has no receive buffers (they
are reported as predicted only). Transient gradient tensors inside one backward are in neither.

torch.distributed.pipelining needs one process per rank, so it runs in 4 gloo processes (its GPipe, 1F1B,
Interleaved1F1B, ZBVZeroBubble and DualPipeV on the hand-cut stages of benchmarks/vs_torch_pipelining.py); each
rank counts the same saved tensors, and its parameters and gradients. It has no recomputation switch, so its
rows are for "none" only.

    python benchmarks/memory.py           # ~1 min on 2 CPU cores
    python benchmarks/memory.py --smoke   # a smaller model, three families, no torch run
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
from _common import Column, machine_info, machine_line, markdown_table, parser, write_results
from _meter import Meter, chunk_tensors, storage_key

import bitpipe_fx as bp
from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.compiler import build_plan
from bitpipe_fx.errors import ConfigError
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from bitpipe_fx.plan import Plan
from bitpipe_fx.recompute import with_recompute
from bitpipe_fx.runtime.launch import launch
from bitpipe_fx.schedules import SCHEDULES
from bitpipe_fx.sim import simulate

FULL = {"model": {"vocab": 512, "seq": 64, "dim": 128, "heads": 4, "layers": 8, "micro_batch": 2},
        "devices": 4, "microbatches": 8, "families": tuple(sorted(SCHEDULES)), "torch": True}
SMOKE = {"model": {"vocab": 64, "seq": 16, "dim": 32, "heads": 2, "layers": 8, "micro_batch": 1},
         "devices": 4, "microbatches": 8, "families": ("1f1b", "zbv", "bitpipe"), "torch": False}
TORCH_FAMILIES = {"gpipe": ("ScheduleGPipe", 1, "loop"), "1f1b": ("Schedule1F1B", 1, "loop"),
                  "interleaved": ("ScheduleInterleaved1F1B", 2, "loop"), "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
                  "dualpipev": ("ScheduleDualPipeV", 2, "v")}
MODES = ("none", "full")
GOAL = 0.15  # |predicted - measured| / measured of the peak per device


def measure_bitpipe(family: str, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One family under every recompute mode (one capture): measured and predicted bytes per device, by kind."""
    model, example = gpt(**cfg["model"])
    plan, split = build_plan(model, example, family, cfg["devices"], cfg["microbatches"])
    return [_measure(with_recompute(plan, mode, None), split, example, cfg) for mode in MODES]


def _measure(plan: Plan, split: Any, example: tuple[torch.Tensor, ...], cfg: dict[str, Any]) -> dict[str, Any]:
    d, n = cfg["devices"], cfg["microbatches"]
    pipe = CompiledPipeline(split, plan.program, lm_loss, example, plan=plan, recompute=plan.recompute,
                            optimizer=lambda params: bp.optim.ScheduleFreeAdamW(params, lr=1e-3))
    mc = cfg["model"]
    tokens, targets = lm_batch(mc["vocab"], n * mc["micro_batch"], mc["seq"], seed=1)
    pipe.step(tokens, targets)  # creates the optimizer state
    executor = pipe.executor
    weights = [list(reps.values()) for reps in executor.device_replicas]
    params = [{storage_key(p) for r in reps for p in r.module.parameters()} for reps in weights]
    meter = Meter(d, {ptr for device in params for ptr, _ in device})
    for it in executor._train:  # the benchmark's instrumentation: which device runs, and what it keeps after
        it.run_next = _metered(it, meter)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        pipe.forward_backward(tokens, targets)
    state = _optimizer_bytes(pipe.optimizer, weights)
    predicted = plan.memory()
    rows = []
    for k in range(d):
        measured = {"params": sum(b for _, b in params[k]),
                    "grads": sum(f.numel() * f.element_size() for r in weights[k] for f in r.flat_grads),
                    "optimizer": state[k], "activations": meter.held.peak[k]}
        measured["total"] = sum(measured.values())
        p = predicted[k]
        rows.append({"device": k, "measured": measured, "saved_only": meter.saved.peak[k],
                     "predicted": p.to_dict(), "predicted_total": p.total - p.comm})
    mode = "full" if plan.recompute else "none"
    return {"family": plan.schedule, "recompute": mode, "stages": plan.num_stages, "devices": rows,
            "recomputed": sum(c.recomputed for it in executor._train for c in it.chunks.values())}


def _metered(it: Any, meter: Meter, slot: int | None = None, p2p: Any = None) -> Any:
    """``it.run_next`` that tells the meter which device runs and, after the action, what it keeps: its chunks'
    tensors and, with ``p2p``, the receive buffers posted ahead and the sends not yet completed. ``slot``: the
    meter's device index (default: the interpreter's device)."""
    run, d = it.run_next, it.device if slot is None else slot

    def run_next() -> None:
        meter.device = d
        run()
        buffers = [] if p2p is None else [t for bufs, _ in p2p.posted.values() for t in bufs] + \
            [t for *_, sent in p2p.sent for t in sent]
        meter.keep(d, [*chunk_tensors(it.chunks.values()), *buffers])

    return run_next


def _optimizer_bytes(optimizer: torch.optim.Optimizer, weights: list[list[Any]]) -> list[int]:
    """Optimizer-state tensor bytes of each device's parameters."""
    out = []
    for reps in weights:
        tensors = [t for r in reps for p in r.module.parameters() for t in optimizer.state.get(p, {}).values()
                   if isinstance(t, torch.Tensor)]
        out.append(sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values()))
    return out


# ---- torch.distributed.pipelining, one process per rank ----------------------------------------------------


def torch_rank(cfg: dict[str, Any], families: tuple[str, ...]) -> dict[str, Any]:
    """On each of D ranks: every torch family's peak saved-tensor bytes, parameters and gradients."""
    import vs_torch_pipelining as vs  # the hand-cut stages and torch schedule set-up, shared

    out = {}
    for family in families:
        vs.TORCH_SCHEDULES.setdefault(family, TORCH_FAMILIES[family])  # gpipe is not in that benchmark
        runner = vs.setup_torch(family, cfg["model"], cfg["microbatches"])
        runner.step()  # warm-up: gradients exist after it
        modules = runner.parameters()
        meter = Meter(1, {storage_key(p)[0] for p in modules})
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            runner.step()
        grads = {storage_key(p.grad) for p in modules if p.grad is not None}
        out[family] = {"saved": meter.saved.peak[0], "params": sum(b for _, b in {storage_key(p) for p in modules}),
                       "grads": sum(b for _, b in grads)}
        dist.barrier()
    return out


def bitpipe_rank(cfg: dict[str, Any], families: tuple[str, ...]) -> dict[str, Any]:
    """On each of D ranks (one device each, the distributed executor): the peak of activations plus the receive
    buffers posted ahead and the sends not yet completed, against the prediction with its communication term."""
    mc, d, n = cfg["model"], cfg["devices"], cfg["microbatches"]
    tokens, targets = lm_batch(mc["vocab"], n * mc["micro_batch"], mc["seq"], seed=1)
    out = {}
    for family in families:
        model, example = gpt(**mc)
        pipe = bp.compile(model, example, lm_loss, schedule=family, devices=d, microbatches=n)
        pipe.forward_backward(tokens, targets)  # warm-up
        ex = pipe.executor
        meter = Meter(1, {storage_key(p)[0] for r in ex.replicas for p in r.module.parameters()})
        interp = ex._interp[True]  # the benchmark's instrumentation, as in measure_bitpipe
        interp.run_next = _metered(interp, meter, 0, ex._p2p[True])
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            pipe.forward_backward(tokens, targets)
        predicted = pipe.plan.memory()[ex.device]
        out[family] = {"measured": meter.held.peak[0], "predicted": predicted.activations + predicted.comm,
                       "predicted_comm": predicted.comm}
        dist.barrier()
    return out


# ---- driver -------------------------------------------------------------------------------------------------


def residual(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured else 0.0


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (family, mode): the worst device's measured and predicted peak and the largest residual."""
    rows = []
    for run in runs:
        devices = run["devices"]
        worst = max(devices, key=lambda r: r["measured"]["total"])
        res = [residual(r["predicted_total"], r["measured"]["total"]) for r in devices]
        act = [residual(r["predicted"]["activations"], r["measured"]["activations"]) for r in devices]
        rows.append({
            "family": run["family"], "recompute": run["recompute"], "stages": run["stages"],
            "peak_mb": worst["measured"]["total"] / 2**20, "predicted_mb": worst["predicted_total"] / 2**20,
            "act_mb": max(r["measured"]["activations"] for r in devices) / 2**20,
            "pred_act_mb": max(r["predicted"]["activations"] for r in devices) / 2**20,
            "weights_mb": max(r["measured"]["params"] + r["measured"]["grads"] + r["measured"]["optimizer"]
                              for r in devices) / 2**20,
            "comm_mb": max(r["predicted"]["comm"] for r in devices) / 2**20,
            "residual": max(res, key=abs), "act_residual": max(act, key=abs),
            "per_device_mb": " ".join(f"{r['measured']['total'] / 2**20:.2f}" for r in devices),
            "within_goal": all(abs(x) <= GOAL for x in res),
        })
    by_key = {(r["family"], r["recompute"]): r for r in rows}
    for r in rows:
        base = by_key.get((r["family"], "none"))
        r["act_vs_none"] = r["act_mb"] / base["act_mb"] if base and base["act_mb"] else None
    return rows


COLUMNS = [Column("family", "schedule"), Column("recompute", "recompute"), Column("stages", "S"),
           Column("peak_mb", "peak MiB (worst device)", ".3f"), Column("predicted_mb", "predicted MiB", ".3f"),
           Column("residual", "largest residual", "+.1%"), Column("act_mb", "activations MiB", ".3f"),
           Column("pred_act_mb", "predicted act. MiB", ".3f"), Column("act_residual", "act. residual", "+.1%"),
           Column("act_vs_none", "act. / none", ".2f"), Column("weights_mb", "weights+grads+state MiB", ".3f"),
           Column("comm_mb", "recv buffers MiB (predicted)", ".3f"), Column("per_device_mb", "measured MiB per device")]
DIST_COLUMNS = [Column("family", "schedule"), Column("measured_mb", "measured MiB (max rank)", ".3f"),
                Column("predicted_mb", "predicted MiB (max rank)", ".3f"),
                Column("comm_mb", "of which receive buffers", ".3f"), Column("residual", "largest residual", "+.1%")]
TORCH_COLUMNS = [Column("family", "schedule"), Column("torch_saved_mb", "torch saved MiB (max rank)", ".3f"),
                 Column("bitpipe_saved_mb", "bitpipe_fx saved MiB (max device)", ".3f"),
                 Column("torch_weights_mb", "torch params+grads MiB", ".3f"),
                 Column("bitpipe_weights_mb", "bitpipe_fx params+grads MiB", ".3f")]


def auto_choices(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """What recompute="auto" picks under three limits, for bitpipe alone and searched with the schedule: from a
    little under the smallest peak storing every activation to a little over the smallest recomputing all."""
    model, example = gpt(**cfg["model"])
    d, n = cfg["devices"], cfg["microbatches"]
    rows = []
    for schedule in ("bitpipe", "auto"):
        stored, full = (_smallest_peak(model, example, schedule, d, n, mode) for mode in ("none", "full"))
        for name, limit in (("loose", stored - 0.1 * (stored - full)), ("middle", (stored + full) / 2),
                            ("tight", full + 0.05 * (stored - full))):
            got, _ = build_plan(model, example, schedule, d, n, recompute="auto", memory_limit=limit)
            again = [s for s, f in enumerate(got.recompute) if f]
            rows.append({"limit": name, "limit_mib": limit / 2**20, "schedule": schedule,
                         "chosen": got.search.winner.spec if got.search else got.schedule,
                         "recomputed": ",".join(map(str, again)) or "none", "of": got.num_stages,
                         "predicted_peak_mib": max(m.total for m in got.memory()) / 2**20,
                         "predicted_step_us": 1e6 * simulate(got.program, got.cost_model()).makespan})
    return rows


def _smallest_peak(model: Any, example: tuple, schedule: str, d: int, n: int, mode: str) -> float:
    """The smallest predicted peak of ``schedule`` under recompute ``mode``; for "auto", over every candidate
    (a search under a 1-byte limit simulates them all and names the smallest in its refusal)."""
    if schedule != "auto":
        plan, _ = build_plan(model, example, schedule, d, n, recompute=mode)
        return max(m.total for m in plan.memory())
    try:
        build_plan(model, example, schedule, d, n, recompute=mode, memory_limit=1)
    except ConfigError as exc:
        return float(re.search(r"smallest predicted peak is (\S+) bytes", str(exc)).group(1))  # type: ignore[union-attr]
    raise AssertionError("a 1-byte memory limit was met")


AUTO_COLUMNS = [Column("limit", "limit"), Column("limit_mib", "MiB", ".2f"), Column("schedule", "asked"),
                Column("chosen", "chosen"), Column("recomputed", "recomputed stages"), Column("of", "of S"),
                Column("predicted_peak_mib", "predicted peak MiB", ".2f"),
                Column("predicted_step_us", "predicted step µs", ".1f")]
KIND_COLORS = {"params": "#4c72b0", "grads": "#55a868", "optimizer": "#c44e52", "activations": "#dd8452"}


def draw(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Measured peak per device, stacked by kind, one group per family and mode, the prediction as a tick."""
    try:
        import matplotlib  # optional dependency: the picture is skipped without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(14, 4.5))
    x, ticks, labels = 0.0, [], []
    for run in runs:
        devices = run["devices"]
        for r in devices:
            bottom = 0.0
            for kind, color in KIND_COLORS.items():
                height = r["measured"][kind] / 2**20
                ax.bar(x, height, 0.8, bottom=bottom, color=color, label=kind if x == 0 else None)
                bottom += height
            ax.plot([x - 0.4, x + 0.4], [r["predicted_total"] / 2**20] * 2, color="black", lw=1.2,
                    label="predicted" if x == 0 else None)
            x += 1
        ticks.append(x - (len(devices) + 1) / 2)
        labels.append(f"{run['family']}\n{run['recompute']}")
        x += 1
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel("peak MiB per device")
    ax.set_title("measured peak per device (bars: devices 0..D-1, stacked by kind) and the memory model's prediction")
    ax.legend(fontsize=8, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cfg = SMOKE if args.smoke else FULL
    info = machine_info()
    runs = [run for f in cfg["families"] for run in measure_bitpipe(f, cfg)]
    rows = summarise(runs)
    compare = []
    spread = []
    if cfg["torch"]:
        for rank, result in enumerate(launch(bitpipe_rank, cfg["devices"], args=(cfg, cfg["families"]))):
            spread += [{"family": f, "rank": rank, **r} for f, r in result.items()]
        families = tuple(f for f in TORCH_FAMILIES if f in cfg["families"])
        ranks = launch(torch_rank, cfg["devices"], args=(cfg, families), backend="gloo")
        for f in families:
            mine = next(r for r in runs if r["family"] == f and r["recompute"] == "none")["devices"]
            compare.append({
                "family": f, "torch_saved_mb": max(r[f]["saved"] for r in ranks) / 2**20,
                "bitpipe_saved_mb": max(r["saved_only"] for r in mine) / 2**20,
                "torch_weights_mb": max(r[f]["params"] + r[f]["grads"] for r in ranks) / 2**20,
                "bitpipe_weights_mb": max(r["measured"]["params"] + r["measured"]["grads"] for r in mine) / 2**20,
            })
    choices = auto_choices(cfg)
    dist_rows = [{"family": f, "measured_mb": max(r["measured"] for r in spread if r["family"] == f) / 2**20,
                  "predicted_mb": max(r["predicted"] for r in spread if r["family"] == f) / 2**20,
                  "comm_mb": max(r["predicted_comm"] for r in spread if r["family"] == f) / 2**20,
                  "residual": max((residual(r["predicted"], r["measured"]) for r in spread if r["family"] == f),
                                  key=abs)}
                 for f in dict.fromkeys(r["family"] for r in spread)]
    worst = max(rows, key=lambda r: abs(r["residual"]))
    md = [f"## Peak memory per device: measured vs the memory model (D={cfg['devices']}, N={cfg['microbatches']})",
          "", machine_line(info), "",
          f"GPT {cfg['model']}, float32, Schedule-Free AdamW. Largest residual of the predicted peak: "
          f"{worst['residual']:+.1%} ({worst['family']}, recompute={worst['recompute']}); goal ±{GOAL:.0%}.", "",
          markdown_table(rows, COLUMNS)]
    if dist_rows:
        md += ["", "### Distributed executor (4 gloo processes): activations + receive buffers + pending sends", "",
               markdown_table(dist_rows, DIST_COLUMNS)]
    if compare:
        md += ["", "### Against torch.distributed.pipelining (recompute none; torch on hand-cut stages)", "",
               markdown_table(compare, TORCH_COLUMNS)]
    md += ["", "### recompute=\"auto\" under three memory limits (predicted; the plan's FLOP-rate times)", "",
           markdown_table(choices, AUTO_COLUMNS)]
    args.out.mkdir(parents=True, exist_ok=True)
    picture = draw(runs, args.out / "memory.png")
    if picture is not None:
        md += ["", f"![peak memory per device by kind]({picture.name})"]
    payload = {"machine": info, "config": cfg, "runs": runs, "rows": rows, "torch": compare, "auto": choices,
               "distributed": spread, "goal": GOAL}
    write_results(args.out, "memory", payload, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
