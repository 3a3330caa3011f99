"""Runtime overhead of the local executor: split backward (I + W) against the fused backward B, and the Python
time the interpreter spends per action.

One process, ``torch.set_num_threads(1)``: the examples' GPT-style model is cut for ``zbv`` on 2 devices
(4 stages). The split program is zbv's own; its fused peer is the same program with every I replaced by B
and every W dropped, so both run the same stages, micro-batches and order of forwards. Each round runs one
recorded step of each in turn (a load change hits both alike). Per step:

- B, I, W: the sum over the step's actions of that kind (all stages, all micro-batches) of each action's
  fastest recorded duration over the rounds; (I+W)/B compares the split program's I + W with the fused
  peer's B (the median of the per-round ratio alongside).
- Python per action: (step wall time - every recorded compute action - the end-of-step gradient sum)
  / number of actions. What is left is the interpreter, the executor's loop, message checks and the
  recorder itself; it is also given as a fraction of the mean compute action of the same step.

Python time is the minimum over rounds (interference only adds time), the median alongside. To compare with an
older tree, run this file with that tree's interpreter (its editable install supplies ``bitpipe_fx``) and
pass the JSON to ``--baseline``:

    /work/main/.venv/bin/python benchmarks/runtime_overhead.py --label main --out /tmp/before
    python benchmarks/runtime_overhead.py --baseline /tmp/before/runtime_overhead.json
    python benchmarks/runtime_overhead.py --smoke
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import Column, machine_info, machine_line, markdown_table, parser, write_results

import bitpipe_fx
from bitpipe_fx.api import CompiledPipeline
from bitpipe_fx.compiler import build_plan
from bitpipe_fx.examples.models import gpt, lm_batch, lm_loss
from bitpipe_fx.schedules.ir import Action, Program

FULL = {"model": {"vocab": 2048, "seq": 128, "dim": 256, "heads": 4, "layers": 8, "micro_batch": 3},
        "schedule": "zbv", "devices": 2, "microbatches": 8, "warmup": 2, "rounds": 15}
SMOKE = {"model": {"vocab": 64, "seq": 16, "dim": 32, "heads": 2, "layers": 4, "micro_batch": 1},
         "schedule": "zbv", "devices": 2, "microbatches": 4, "warmup": 1, "rounds": 2}
COMPUTE = ("F", "B", "I", "W")


def fused(program: Program) -> Program:
    """The same program with each I turned into B and each W dropped: the fused-backward peer."""
    rows = tuple(tuple(Action("B", a.pipe, a.stage, a.microbatch) if a.kind == "I" else a
                       for a in row if a.kind != "W") for row in program.device_actions)
    return Program(f"{program.name}-fused", program.placement, program.pipe_of, rows)


def step_figures(pipe: CompiledPipeline, tokens: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """One recorded step: per-kind compute sums, the gradient-sum time, the wall time and the action count."""
    start = time.perf_counter()
    pipe.forward_backward(tokens, targets, record=True)
    wall = time.perf_counter() - start
    sums = {k: 0.0 for k in (*COMPUTE, "SYNC")}
    durations: dict[str, float] = {}
    for e in pipe.last_timeline:
        sums[e.kind] = sums.get(e.kind, 0.0) + (e.end - e.start)
        if e.kind in COMPUTE:
            durations[e.name] = e.end - e.start
    actions = sum(len(row) for row in pipe.program.device_actions)
    compute = sum(sums[k] for k in COMPUTE)
    grad_sum = max((e.end - e.start for e in pipe.last_timeline if e.kind == "SYNC"), default=0.0)  # one per device
    return {**sums, "wall": wall, "actions": actions, "compute": compute, "grad_sum": grad_sum,
            "python_per_action": (wall - compute - grad_sum) / actions, "durations": durations}


def kind_minimum(rounds: list[dict[str, Any]], kind: str) -> float:
    """Sum over the actions of ``kind`` of each action's fastest duration over the rounds (load only adds)."""
    names = {n for r in rounds for n in r["durations"] if n.startswith(kind)}
    return sum(min(r["durations"][n] for r in rounds) for n in names)


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Interleaved rounds of the fused and the split step; raw per-round figures of both."""
    torch.set_num_threads(1)
    model, (tokens_mb,) = gpt(**cfg["model"])
    m = cfg["model"]
    tokens, targets = lm_batch(m["vocab"], m["micro_batch"] * cfg["microbatches"], m["seq"], seed=1)
    plan, split = build_plan(model, (tokens_mb,), cfg["schedule"], cfg["devices"], cfg["microbatches"])
    pipes = {"split": CompiledPipeline(split, plan.program, lm_loss, (tokens_mb,), plan=plan),
             "fused": CompiledPipeline(split, fused(plan.program), lm_loss, (tokens_mb,), plan=plan)}
    for _ in range(cfg["warmup"]):
        for pipe in pipes.values():
            pipe.forward_backward(tokens, targets)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in pipes}
    for _ in range(cfg["rounds"]):
        for name, pipe in pipes.items():
            rounds[name].append(step_figures(pipe, tokens, targets))
    grads = [torch.cat([r.flat_grads[0] for r in p.executor.replicas]) for p in pipes.values()]
    return {"rounds": rounds, "grad_max_abs_diff": float((grads[0] - grads[1]).abs().max()),
            "stages": split.num_stages, "params": sum(p.numel() for p in model.parameters())}


def summarise(label: str, raw: dict[str, Any]) -> dict[str, Any]:
    """One table row: minima (medians alongside) of B, I, W, (I+W)/B and the Python time per action."""
    fused_r, split_r = raw["rounds"]["fused"], raw["rounds"]["split"]
    b, i, w = kind_minimum(fused_r, "B"), kind_minimum(split_r, "I"), kind_minimum(split_r, "W")
    ratios = [(s["I"] + s["W"]) / f["B"] for f, s in zip(fused_r, split_r)]
    py = [r["python_per_action"] for r in split_r]
    mean_action = [r["compute"] / r["actions"] for r in split_r]
    row = {
        "tree": label,
        "b_ms": 1e3 * b, "i_ms": 1e3 * i, "w_ms": 1e3 * w, "iw_over_b": (i + w) / b,
        "iw_over_b_median": statistics.median(ratios),
        "python_ms_per_action": 1e3 * min(py), "python_ms_per_action_median": 1e3 * statistics.median(py),
        "python_over_mean_action": min(py) / statistics.median(mean_action),
        "fused_python_ms_per_action": 1e3 * min(r["python_per_action"] for r in fused_r),
        "split_step_over_fused": min(r["wall"] for r in split_r) / min(r["wall"] for r in fused_r),
        "grad_max_abs_diff": raw["grad_max_abs_diff"],
    }
    return row


COLUMNS = (
    Column("tree", "tree"), Column("b_ms", "B ms (fused step)", ".1f"), Column("i_ms", "I ms", ".1f"),
    Column("w_ms", "W ms", ".1f"), Column("iw_over_b", "(I+W)/B", ".3f"),
    Column("iw_over_b_median", "(I+W)/B median", ".3f"), Column("python_ms_per_action", "Python ms/action", ".3f"),
    Column("python_ms_per_action_median", "median", ".3f"),
    Column("python_over_mean_action", "Python / mean action", ".3f"),
    Column("fused_python_ms_per_action", "fused step Python ms/action", ".3f"),
    Column("split_step_over_fused", "split step / fused step", ".3f"),
    Column("grad_max_abs_diff", "max |g_split - g_fused|", ".1e"),
)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--label", default="this tree", help="name of this run's row (e.g. the branch measured)")
    p.add_argument("--baseline", type=Path, default=None, help="JSON of an earlier run to show as the first row")
    p.add_argument("--rounds", type=int, default=None, help="rounds of (fused, split) steps")
    args = p.parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    info = machine_info()
    raw = measure(cfg)
    rows = [summarise(args.label, raw)]
    if args.baseline is not None:
        rows = [*json.loads(args.baseline.read_text())["rows"], *rows]
    m = cfg["model"]
    describe = (f"GPT-style example model: {m['layers']} layers, dim {m['dim']}, {m['heads']} heads, seq {m['seq']}, "
                f"vocab {m['vocab']}, {raw['params'] / 1e6:.1f} M parameters, float32; {cfg['schedule']} on "
                f"{cfg['devices']} devices ({raw['stages']} stages) in the local executor, one process, 1 thread; "
                f"N = {cfg['microbatches']} micro-batches x {m['micro_batch']} sequences; {cfg['rounds']} rounds "
                "of one recorded step each of the fused peer (every I -> B, W dropped) and the split program. "
                "B / I / W = sum over the step's actions of that kind of each action's fastest recorded duration "
                "over the rounds; '(I+W)/B median' = median over rounds of the per-round sums' ratio. "
                "Python per action = (step wall - recorded compute - gradient sum) / actions, "
                "recorder included; 'Python / mean action' divides it by the mean compute action of the step.")
    md = "\n\n".join(["## Runtime overhead: split backward and Python per action", machine_line(info),
                      describe, markdown_table(rows, COLUMNS)])
    payload = {"machine": info, "config": cfg, "package": str(Path(bitpipe_fx.__file__).parent),
               "rows": rows, "raw": raw if not args.smoke else {"rounds": raw["rounds"]}}
    json_path, md_path = write_results(args.out, "runtime_overhead", payload, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
