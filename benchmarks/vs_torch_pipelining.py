"""bitpipe_fx against torch.distributed.pipelining: same model, same batch, same processes, measured.

The examples' GPT-style model, sized so a step takes about a second on two 1-thread gloo processes. torch's
schedules (Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble, ScheduleDualPipeV when the
installed torch has it) get hand-set split points, as their users must write them: equal numbers of blocks
per stage, the embedding in the first stage, the LM head in the last, and the tied embedding/head weight
kept as two copies whose gradients are summed after the step (locally when one rank holds both stages, by
an all-reduce otherwise). bitpipe_fx runs 1f1b, interleaved, zbv, dualpipev and bitpipe, all from
``bitpipe_fx.compile`` (its own partition). One more torch row, ``1f1b-autocut``, runs torch's Schedule1F1B on
bitpipe_fx's 1f1b stage modules (its passes, not its runtime): it separates what the cut points are worth
from what the runtime is worth.

Two passes. First, each (library, schedule) runs in fresh processes: its first step's gradients are
checked against a non-pipelined reference (and the two libraries' against each other), and its peak memory
per process is the RSS high-water mark over its first steps (CUDA max allocated on GPUs). Then one set of
processes holds every run and times them in rounds, each round a step of every run in turn, so that a
change in the (shared) machine's load hits every run alike. The step time is the fastest of a run's timed
steps: on a machine shared with other jobs, interference only ever adds time, so the minimum estimates the
uncontended step (the median is reported too).
Steps compute gradients only (no optimizer on either side) and start and end at a barrier.

    python benchmarks/vs_torch_pipelining.py           # ~5 min on 2 CPU cores
    python benchmarks/vs_torch_pipelining.py --smoke   # tiny model, 1 timed step per run
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import (
    Column,
    machine_info,
    machine_line,
    markdown_table,
    median,
    memory_now,
    parser,
    peak_memory,
    reset_peak_memory,
    time_steps,
    write_results,
)
from torch import nn

from bitpipe_fx.examples.models import GPT, gpt, lm_batch, lm_loss
from bitpipe_fx.runtime.launch import LaunchError, launch

TORCH_SCHEDULES = {  # name -> (torch class name, stages per rank, placement style)
    "1f1b": ("Schedule1F1B", 1, "loop"),
    "interleaved": ("ScheduleInterleaved1F1B", 2, "loop"),
    "zbv": ("ScheduleZBVZeroBubble", 2, "v"),
    "dualpipev": ("ScheduleDualPipeV", 2, "v"),
    "1f1b-autocut": ("Schedule1F1B", 1, "loop"),  # bitpipe_fx's cut points (its passes) under torch's 1F1B
}
AUTOCUT = "-autocut"
BITPIPE_SCHEDULES = ("1f1b", "interleaved", "zbv", "dualpipev", "bitpipe", "auto")  # auto: the simulator picks
FULL = {"model": {"vocab": 2048, "seq": 128, "dim": 256, "heads": 4, "layers": 8, "micro_batch": 3},
        "microbatches": 8, "memory_steps": 2, "warmup": 1, "rounds": 8, "steps": 1}
SMOKE = {"model": {"vocab": 64, "seq": 16, "dim": 32, "heads": 2, "layers": 4, "micro_batch": 1},
         "microbatches": 4, "memory_steps": 1, "warmup": 1, "rounds": 1, "steps": 1}
SMOKE_RUNS = (("torch", "1f1b"), ("bitpipe_fx", "1f1b"), ("bitpipe_fx", "bitpipe"), ("bitpipe_fx", "auto"))
AGREE_RTOL = 1e-5  # float32 contract of DESIGN.md: max |a-b| / max |b| per parameter


def batch(cfg: dict[str, Any], microbatches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The one batch every run uses: N micro-batches of ``micro_batch`` sequences."""
    return lm_batch(cfg["vocab"], microbatches * cfg["micro_batch"], cfg["seq"], seed=1234)


def reference_grads(cfg: dict[str, Any], microbatches: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Non-pipelined reference: for m, (loss(model(x_m), y_m) / N).backward(); the mean loss and grads by FQN."""
    model, _ = gpt(**cfg)
    tokens, targets = batch(cfg, microbatches)
    total = 0.0
    for x, y in zip(tokens.chunk(microbatches), targets.chunk(microbatches)):
        loss = lm_loss(model(x), y) / microbatches
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a-b| / max |b| (the absolute difference when b vanishes)."""
    scale = float(b.abs().max())
    diff = float((a.double() - b.double()).abs().max())
    return diff / scale if scale > 0 else diff


def max_rel_err(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Worst parameter's relative error; infinite when a parameter's gradient is missing."""
    if set(grads) != set(ref):
        return float("inf")
    return max(rel_err(grads[n], ref[n]) for n in ref)


# ---- torch.distributed.pipelining, split by hand ------------------------------------------------


class HandStage(nn.Module):
    """Blocks [lo, hi) of the GPT; the first stage embeds, the last holds ln_f and its own copy of the head."""

    def __init__(self, model: GPT, lo: int, hi: int, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.tok_emb, self.pos_emb, self.drop = model.tok_emb, model.pos_emb, model.drop
        self.blocks = nn.ModuleList(model.blocks[lo:hi])
        if last:
            self.ln_f = model.ln_f
            self.head_weight = nn.Parameter(model.tok_emb.weight.detach().clone())  # untied copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            positions = torch.arange(x.shape[1], device=x.device)
            x = self.drop(self.tok_emb(x) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.head_weight) if self.last else x


def stage_ranks(style: str, ranks: int, stages: int) -> list[int]:
    """Rank of every stage: loop (s mod P) or V (s on s for s < P, else 2P-1-s)."""
    if style == "loop":
        return [s % ranks for s in range(stages)]
    return [s if s < ranks else 2 * ranks - 1 - s for s in range(stages)]


def _device() -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def hand_stages(cfg: dict[str, Any], n_stages: int, mine: list[int], device: torch.device
                ) -> tuple[dict[int, nn.Module], dict[int, str], list[nn.Parameter]]:
    """Equal blocks per stage; returns (stage -> module, id(param) -> FQN, this rank's copies of the tied weight)."""
    if cfg["layers"] % n_stages:
        raise ValueError(f"layers={cfg['layers']} must be a multiple of the {n_stages} hand-cut stages")
    model, _ = gpt(**cfg)
    model.to(device)
    names = {id(p): n for n, p in model.named_parameters()}
    per = cfg["layers"] // n_stages
    modules = {s: HandStage(model, s * per, (s + 1) * per, s == 0, s == n_stages - 1) for s in mine}
    tied = [m.tok_emb.weight for m in modules.values() if m.first] + [m.head_weight for m in modules.values()
                                                                       if m.last]
    return modules, names, tied


class CutStage(nn.Module):
    """A bitpipe_fx stage module in torch.distributed.pipelining's shape: one tensor out where there is one, and
    contiguous (torch's p2p sends only contiguous tensors; a cut after a transpose is not)."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, *values: torch.Tensor) -> Any:
        out = tuple(t.contiguous() for t in self.stage(*values))
        return out[0] if len(out) == 1 else out


def cut_stages(cfg: dict[str, Any], microbatches: int, n_stages: int, mine: list[int], device: torch.device
               ) -> tuple[dict[int, nn.Module], dict[int, str], list[nn.Parameter]]:
    """bitpipe_fx's 1f1b partition (its passes, no runtime) wrapped for torch; same return as ``hand_stages``."""
    from bitpipe_fx.compiler import build_plan

    model, example = gpt(**cfg)
    model.to(device)
    _, split = build_plan(model, tuple(t.to(device) for t in example), "1f1b", n_stages, microbatches)
    if any(spec.model_inputs for spec in split.specs[1:]):
        raise ValueError("a later stage reads a model input; torch.distributed.pipelining feeds only stage 0")
    modules = {s: CutStage(split.stages[s]) for s in mine}
    names, tied = {}, []
    for m in modules.values():
        for name, p in m.stage.named_parameters():
            names[id(p)] = name
            if name in split.shared:
                tied.append(p)
    return modules, names, tied


@dataclass
class Runner:
    """One (library, schedule) set up on this rank: ``step()`` runs a training step (gradients only)."""

    step: Callable[[], None]
    gradients: Callable[[], dict[str, torch.Tensor]]  # this rank's gradients by original FQN (CPU copies)
    loss: Callable[[], float | None]  # mean loss of the last step, where this rank knows it
    stages: int
    balance: float | None = None
    chosen: str | None = None  # for schedule="auto": the spec the search picked
    parameters: Callable[[], list[nn.Parameter]] = list  # this rank's parameters (benchmarks/memory.py counts them)


def setup_torch(schedule: str, cfg: dict[str, Any], microbatches: int) -> Runner:
    """torch.distributed.pipelining on this rank's stages (hand-cut, or bitpipe_fx's cut for ``*-autocut``)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as torch_schedules

    cls_name, per_rank, style = TORCH_SCHEDULES[schedule]
    rank, ranks = dist.get_rank(), dist.get_world_size()
    device = _device()
    n_stages = per_rank * ranks
    owner = stage_ranks(style, ranks, n_stages)
    mine = [s for s in range(n_stages) if owner[s] == rank]
    if schedule.endswith(AUTOCUT):
        modules, names, tied = cut_stages(cfg, microbatches, n_stages, mine, device)
    else:
        modules, names, tied = hand_stages(cfg, n_stages, mine, device)
    stages = [PipelineStage(modules[s], s, n_stages, device) for s in mine]
    tie_ranks = sorted({owner[0], owner[-1]})
    tie_group = dist.new_group(tie_ranks) if len(tie_ranks) > 1 else None
    cls = getattr(torch_schedules, cls_name)
    sched = cls(stages[0], microbatches, loss_fn=lm_loss) if per_rank == 1 else cls(stages, microbatches,
                                                                                      loss_fn=lm_loss)
    tokens, targets = (t.to(device) for t in batch(cfg, microbatches))
    losses: list[torch.Tensor] = []

    def sum_tied() -> None:
        """Give every copy of the tied embedding/head weight the sum of all copies' gradients (a torch user's
        job: locally when one rank holds both uses, else an all-reduce between the two ranks)."""
        if not tied:
            return
        total = tied[0].grad.clone()
        for p in tied[1:]:
            total += p.grad
        if tie_group is not None:
            dist.all_reduce(total, group=tie_group)
        for p in tied:
            p.grad = total

    def step() -> None:
        for m in modules.values():
            m.zero_grad(set_to_none=True)
        losses.clear()
        args = (tokens,) if 0 in modules else ()
        target = targets if n_stages - 1 in modules else None
        sched.step(*args, target=target, losses=losses)
        sum_tied()

    def gradients() -> dict[str, torch.Tensor]:
        return {names[id(p)]: p.grad.detach().cpu().clone() for m in modules.values() for p in m.parameters()
                if p.grad is not None and id(p) in names}

    def loss() -> float | None:
        return float(sum(float(x.detach()) for x in losses) / microbatches) if losses else None

    return Runner(step, gradients, loss, n_stages,
                  parameters=lambda: [p for m in modules.values() for p in m.parameters()])


def setup_bitpipe(schedule: str, cfg: dict[str, Any], microbatches: int) -> Runner:
    """bitpipe_fx.compile on the whole model (its own partition and runtime)."""
    import bitpipe_fx as bp

    ranks = dist.get_world_size()
    device = _device()
    model, example = gpt(**cfg)
    model.to(device)
    pipe = bp.compile(model, tuple(t.to(device) for t in example), lm_loss, schedule=schedule, devices=ranks,
                      microbatches=microbatches)
    tokens, targets = (t.to(device) for t in batch(cfg, microbatches))
    losses: list[float] = []

    def step() -> None:
        losses[:] = [pipe.forward_backward(tokens, targets)]

    def gradients() -> dict[str, torch.Tensor]:
        return {n: g.cpu() for n, g in pipe.gradients().items()}

    plan = pipe.plan
    chosen = plan.search.winner.spec if plan is not None and plan.search is not None else None
    return Runner(step, gradients, lambda: losses[0] if losses else None, pipe.program.stages,
                  plan.balance if plan is not None else None, chosen)


def setup(library: str, schedule: str, cfg: dict[str, Any], microbatches: int) -> Runner:
    runner = (setup_torch if library == "torch" else setup_bitpipe)(schedule, cfg, microbatches)
    gc.collect()
    return runner


def first_steps(library: str, schedule: str, cfg: dict[str, Any], microbatches: int, steps: int) -> dict[str, Any]:
    """Fresh processes: the first step's gradients and loss, and the peak memory over ``steps`` steps."""
    runner = setup(library, schedule, cfg, microbatches)
    device = _device()
    reset_peak_memory()
    before = memory_now()
    runner.step()
    grads, loss = runner.gradients(), runner.loss()
    for _ in range(steps - 1):
        _sync(device)
        runner.step()
    _sync(device)
    kind, peak = peak_memory()
    return {"grads": grads, "loss": loss, "memory_kind": kind, "peak_memory": peak, "memory_before": before,
            "stages": runner.stages, "balance": runner.balance, "chosen": runner.chosen}


def timed_rounds(runs: list[tuple[str, str]], cfg: dict[str, Any], microbatches: int, warmup: int, rounds: int,
                 steps: int) -> dict[str, list[float]]:
    """One set of processes holding every run: ``rounds`` rounds, each timing ``steps`` steps of every run in
    turn (the order rotating), so that a change in the machine's load hits every run alike."""
    device = _device()
    runners = [setup(lib, s, cfg, microbatches) for lib, s in runs]
    for r in runners:
        time_steps(r.step, warmup, 0, sync=lambda: _sync(device))
    times: dict[str, list[float]] = {f"{lib}:{s}": [] for lib, s in runs}
    for k in range(rounds):
        for i in range(len(runs)):
            j = (i + k) % len(runs)
            key = f"{runs[j][0]}:{runs[j][1]}"
            times[key] += time_steps(runners[j].step, 0, steps, sync=lambda: _sync(device))
    return times


# ---- driver --------------------------------------------------------------------------------------


def _launch(fn: Callable[..., Any], procs: int, args: tuple) -> list[Any]:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return launch(fn, procs, backend, args=args, timeout=300.0, threads=1)


def first_step_row(library: str, schedule: str, procs: int, cfg: dict[str, Any], microbatches: int,
                   steps: int) -> dict[str, Any]:
    """Launch one (library, schedule) in fresh processes; fold the ranks' gradients and memory into one row."""
    started = time.perf_counter()
    results = _launch(first_steps, procs, (library, schedule, cfg, microbatches, steps))
    grads: dict[str, torch.Tensor] = {}
    for r in results:
        for name, g in r["grads"].items():
            grads.setdefault(name, g)
    return {
        "library": library,
        "schedule": schedule,
        "chosen": results[0]["chosen"],
        "stages": results[0]["stages"],
        "partition_balance": results[0]["balance"],
        "loss": next((r["loss"] for r in results if r["loss"] is not None), None),
        "memory_kind": results[0]["memory_kind"],
        "peak_memory_mb": [r["peak_memory"] / 2**20 for r in results],
        "memory_before_mb": [r["memory_before"] / 2**20 for r in results],
        "wall_s": time.perf_counter() - started,
        "_grads": grads,
    }


def _last_error(text: str) -> str:
    """The exception line at the end of a rank's traceback."""
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(" ")]
    return lines[-1] if lines else text


def available_torch_schedules() -> list[str]:
    from torch.distributed.pipelining import schedules as torch_schedules

    return [n for n, (cls, _, _) in TORCH_SCHEDULES.items() if hasattr(torch_schedules, cls)]


def render(payload: dict[str, Any]) -> str:
    cfg, rows = payload["config"], payload["rows"]
    model = cfg["model"]
    unavailable = payload["torch_unavailable"]
    lines = [
        "## bitpipe_fx vs torch.distributed.pipelining (measured)",
        "",
        machine_line(payload["machine"]),
        "",
        f"GPT-style example model: {model['layers']} layers, dim {model['dim']}, {model['heads']} heads, seq "
        f"{model['seq']}, vocab {model['vocab']} (tied head), {payload['parameters'] / 1e6:.1f} M parameters, float32; "
        f"batch = {cfg['microbatches']} micro-batches x {model['micro_batch']} sequences; {payload['procs']} "
        f"{payload['backend']} processes, 1 thread each; step = the fastest of {cfg['rounds']} rounds x "
        f"{cfg['steps']} step(s), every run timed in turn in each round, after {cfg['warmup']} warm-up (gradients "
        "only, no optimizer; barrier before and after each step); interference from other jobs only adds time, "
        "so the minimum estimates the uncontended step (median alongside). 'vs fastest torch' = step "
        f"time / the fastest hand-cut torch schedule's ({payload['fastest_torch']}); below 1 is faster. "
        "1f1b-autocut = torch's Schedule1F1B on bitpipe_fx's stage modules (its cut points). Peak memory = "
        f"{rows[0]['memory_kind'] if rows else ''} per process (MB) during the steps; 'of which steps' = that peak "
        "minus the memory in use just before the first step (model, imports), in fresh processes per run. "
        f"Gradients: max over "
        f"parameters of max|g - g_ref| / max|g_ref| against the non-pipelined reference (float32; agree if "
        f"<= {AGREE_RTOL:g}).",
        "",
        markdown_table(rows, [
            Column("library", "library"), Column("schedule", "schedule"), Column("stages", "stages"),
            Column("step_s", "step s", ".3f"), Column("median_s", "median s", ".3f"),
            Column("vs_fastest_torch", "vs fastest torch", ".3f"),
            Column("peak_memory", "peak memory MB (per rank)"), Column("step_memory", "of which steps MB"),
            Column("grad_err", "grad err vs ref", ".1e"),
            Column("grad_err_vs_torch", "vs torch same schedule", ".1e"), Column("agrees", "agrees"),
        ]),
    ]
    if payload.get("failed"):
        lines += ["", "Runs that failed (not timed): " + "; ".join(f"{k}: {v}" for k, v in payload["failed"].items())]
    if unavailable:
        lines += ["", f"Not in this torch ({payload['machine']['torch']}): {', '.join(unavailable)}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2, help="pipeline processes (devices)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 8, smoke 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run and round (default 1)")
    p.add_argument("--runs", default=None,
                   help="comma-separated library:schedule pairs to run, e.g. torch:1f1b,bitpipe_fx:bitpipe "
                        "(default: every torch schedule this torch has and every bitpipe_fx one; smoke: "
                        + ",".join(f"{lib}:{s}" for lib, s in SMOKE_RUNS) + ")")
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    for key in ("rounds", "steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    started = time.perf_counter()
    info = machine_info()
    ref_loss, ref = reference_grads(cfg["model"], cfg["microbatches"])
    torch_names = available_torch_schedules()
    runs = [("torch", s) for s in torch_names] + [("bitpipe_fx", s) for s in BITPIPE_SCHEDULES]
    if args.runs is not None:
        runs = [tuple(item.split(":", 1)) for item in args.runs.split(",")]
    elif args.smoke:
        runs = list(SMOKE_RUNS)
    unknown = [f"{lib}:{s}" for lib, s in runs if (lib, s) not in
               {("torch", n) for n in torch_names} | {("bitpipe_fx", n) for n in BITPIPE_SCHEDULES}]
    if unknown:
        p.error(f"unknown or unavailable runs {unknown}; torch has {torch_names}, bitpipe_fx {BITPIPE_SCHEDULES}")
    rows, failed = [], {}
    for library, schedule in runs:
        try:
            rows.append(first_step_row(library, schedule, args.procs, cfg["model"], cfg["microbatches"],
                                       cfg["memory_steps"]))
        except LaunchError as exc:  # a peer's run that fails on this model is reported, not fatal
            failed[f"{library}:{schedule}"] = _last_error(str(exc))
            print(f"{library:10s} {schedule:12s} FAILED: {failed[f'{library}:{schedule}']}", flush=True)
            continue
        print(f"{library:10s} {schedule:12s} first steps done ({rows[-1]['wall_s']:.0f} s)", flush=True)
    runs = [(lib, s) for lib, s in runs if f"{lib}:{s}" not in failed]
    times = _launch(timed_rounds, args.procs, (runs, cfg["model"], cfg["microbatches"], cfg["warmup"],
                                               cfg["rounds"], cfg["steps"]))[0]
    for r in rows:
        r["step_times_s"] = times[f"{r['library']}:{r['schedule']}"]
        r["step_s"] = min(r["step_times_s"])
        r["median_s"] = median(r["step_times_s"])
        print(f"{r['library']:10s} {r['schedule']:12s} {r['step_s']:.3f} s/step", flush=True)
    torch_rows = [r for r in rows if r["library"] == "torch"]
    fastest = min([r for r in torch_rows if not r["schedule"].endswith(AUTOCUT)] or torch_rows,
                  key=lambda r: r["step_s"])
    by_key = {(r["library"], r["schedule"]): r for r in rows}
    for r in rows:
        r["vs_fastest_torch"] = r["step_s"] / fastest["step_s"]
        r["grad_err"] = max_rel_err(r["_grads"], ref)
        peer = by_key.get(("torch", r["schedule"])) if r["library"] == "bitpipe_fx" else None
        r["grad_err_vs_torch"] = max_rel_err(r["_grads"], peer["_grads"]) if peer else None
        r["agrees"] = r["grad_err"] <= AGREE_RTOL and (peer is None or r["grad_err_vs_torch"] <= AGREE_RTOL)
        r["loss_err"] = abs(r["loss"] - ref_loss) / abs(ref_loss) if r["loss"] is not None else None
        r["peak_memory"] = " / ".join(f"{m:.0f}" for m in r["peak_memory_mb"])
        r["step_memory"] = " / ".join(f"{m - b:.0f}" for m, b in zip(r["peak_memory_mb"], r["memory_before_mb"]))
    for r in rows:
        del r["_grads"]
        if r["chosen"] is not None:
            r["schedule"] = f"{r['schedule']} -> {r['chosen']}"
    payload = {
        "benchmark": "vs_torch_pipelining",
        "smoke": args.smoke,
        "machine": info,
        "procs": args.procs,
        "backend": "nccl" if torch.cuda.is_available() else "gloo",
        "config": cfg,
        "parameters": sum(g.numel() for g in ref.values()),
        "reference_loss": ref_loss,
        "torch_unavailable": [n for n in TORCH_SCHEDULES if n not in torch_names],
        "fastest_torch": fastest["schedule"],
        "rows": rows,
        "failed": failed,
        "seconds": time.perf_counter() - started,
    }
    json_path, md_path = write_results(args.out, "vs_torch_pipelining", payload, render(payload))
    print(f"wrote {json_path} and {md_path} in {payload['seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
