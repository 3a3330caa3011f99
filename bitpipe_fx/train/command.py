"""`bitpipe-fx train` and `bitpipe-fx demo`: the main job, a real pipelined training run end to end.

Everything is checked before a process starts (schedule and device constraints, batch shape, corpus,
checkpoint); then the run goes one of three ways, with nothing to change in the command:

- plain ``bitpipe-fx train ...``: D x data-parallel local processes through ``bitpipe_fx.runtime.launch``
  (gloo on CPU; NCCL when there is a GPU per process), one thread each;
- under ``torchrun --nproc-per-node D ...``: this process is one rank (GPU when there is one per process);
- with ``--local``: one process runs every device (the local executor; for debugging).

The output folder (``--out``) gets plan.json, loss.png, timeline.png/.json (a measured step next to the
simulator's prediction), metrics.json and checkpoint/ (``--resume`` continues from it). ``demo`` is ``train``
with a preset that finishes in a few minutes on two CPU cores and also checks the losses against the same
model trained without pipelining.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import astuple
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.schedules.spec import AUTO, ScheduleSpec, parse_spec, schedule_spec
from bitpipe_fx.train.job import DTYPES, OPTIMIZERS, TrainConfig, check, factory_target
from bitpipe_fx.train.rundir import check_out, clear_run

if TYPE_CHECKING:  # the report imports the plan and torch; the command line starts without them
    from bitpipe_fx.train.report import Setting

# `bitpipe-fx demo`: a GPT-style byte-level LM on the standard library's source, bitpipe on 4 local processes
DEMO = {
    "steps": 200, "eval_every": 25, "compare_steps": 3, "out": "runs/demo", "arg": ["dim=96", "layers=8", "heads=4"],
}


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets the torch.distributed environment)."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def add_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """Register `train` or `demo` (the same arguments; demo has the preset defaults)."""
    p = subparsers.add_parser(name, help=help, description=__doc__)
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help="gpt, bert, or MODULE:FACTORY returning (model, example_inputs)")
    p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model factory keyword argument (repeatable), e.g. --arg layers=12 --arg dim=256")
    p.add_argument("--task", default=None, help="lm (causal) or mlm (masked); default: from the model's inputs")
    p.add_argument("--schedule", default=d.schedule,
                   help="schedule spec NAME[:key=value,...], e.g. interleaved:chunks=2, or auto")
    p.add_argument("--memory-limit", default=None,
                   help="with --schedule auto or --recompute auto: peak bytes per device (12GiB)")
    p.add_argument("--recompute", default=d.recompute,
                   help="none | full | auto: recompute stage forwards at the backward (auto: fewest that fit "
                        "--memory-limit)")
    p.add_argument("--devices", "-d", type=int, default=d.devices, help="pipeline devices D")
    p.add_argument("--microbatches", "-n", type=int, default=d.microbatches, help="micro-batches N")
    p.add_argument("--data-parallel", type=int, default=d.data_parallel, help="pipeline replicas")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step, all micro-batches (default 16)")
    p.add_argument("--seq-len", type=int, default=None, help="bytes per sequence (default 64)")
    p.add_argument("--optimizer", default=d.optimizer, help=' | '.join(OPTIMIZERS))
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-3; 0.5 for sf-sgd)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay (>= 0)")
    p.add_argument("--dtype", default=d.dtype, help=' | '.join(DTYPES))
    p.add_argument("--seed", type=int, default=d.seed, help="model weights and data order")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="text file or directory to train on (default: the Python standard library's source)")
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="read at most this many bytes")
    p.add_argument("--out", default=d.out, help="output folder (a folder holding a run needs --resume or --overwrite)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (its checkpoints are deleted)")
    p.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                   help="continue from the checkpoint of step STEP in --out (implies --resume)")
    p.add_argument("--eval-every", type=int, default=None, help="validate every K steps (default: steps/10)")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="validation batches")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every K steps")
    p.add_argument("--record-step", type=int, default=None,
                   help="step whose timeline is recorded (default: the run's 3rd)")
    p.add_argument("--compare-steps", type=int, default=d.compare_steps,
                   help="afterwards, train K steps without pipelining and compare the losses")
    p.add_argument("--local", action="store_true", help="run every device in this one process (debugging)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when GPUs are present")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per process")
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds before a stalled rank is an error")
    p.add_argument("--precision", default=d.precision, help="fp32, or bf16-mixed (fp32 master weights, bf16 compute "
                   "and activations)")
    p.add_argument("--on-nonfinite", choices=("raise", "skip"), default=d.on_nonfinite,
                   help="a NaN/inf loss or gradient stops the run (raise) or drops that step's update (skip)")
    p.add_argument("--shard-optimizer", action="store_true",
                   help="ZeRO-1: each rank keeps optimizer state only for its shard of every stage's copies")
    if name == "demo":
        p.set_defaults(**DEMO)
    p.set_defaults(func=lambda args: run(config_from_args(args), name))
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the command line asks for (not yet checked)."""
    from bitpipe_fx.passes.command import parse_kwargs

    spec = parse_spec(args.schedule)
    for_recompute = args.recompute == "auto" and spec.name != AUTO  # else the limit bounds schedule auto
    if args.memory_limit is not None and not for_recompute:
        spec = schedule_spec(spec, {"memory_limit": args.memory_limit})
    return TrainConfig(
        model=args.model, model_args=tuple(sorted(parse_kwargs(args.arg).items())), task=args.task,
        schedule=spec.name, schedule_options=spec.options, devices=args.devices,
        microbatches=args.microbatches, data_parallel=args.data_parallel, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, optimizer=args.optimizer, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, dtype=args.dtype, seed=args.seed, data=args.data, max_bytes=args.max_bytes,
        out=args.out, resume=args.resume or args.resume_from is not None, resume_from=args.resume_from,
        overwrite=args.overwrite, eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, record_step=args.record_step, compare_steps=args.compare_steps,
        local=args.local, cpu=args.cpu, threads=args.threads, timeout=args.timeout, on_nonfinite=args.on_nonfinite,
        shard_optimizer=args.shard_optimizer, precision=args.precision,
        recompute=args.recompute, memory_limit=args.memory_limit if for_recompute else None,
    )


def vocab_size(model: Any) -> int | None:
    """Tokens the model's input embedding holds (Hugging Face's get_input_embeddings, or a config's vocab)."""
    embeddings = getattr(model, "get_input_embeddings", None)
    if callable(embeddings) and hasattr(embeddings(), "num_embeddings"):
        return int(embeddings().num_embeddings)
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", getattr(config, "vocab", None))
    return size if isinstance(size, int) else None


def check_vocab(model: Any, corpus: Any) -> None:
    """Refuse a model whose vocabulary cannot hold every byte of the corpus (an IndexError in every rank)."""
    from bitpipe_fx.train.data import needed_vocab

    have, need = vocab_size(model), needed_vocab(corpus)
    if have is not None and have < need:
        raise ConfigError(f"the model's vocabulary has {have} tokens but {corpus.name} has byte values up to "
                          f"{need - 1}: it needs at least {need}; give it a vocabulary of >= {need} "
                         f"(the built-in models: drop --arg vocab={have}, they use 256)")


def _backend(cfg: TrainConfig, per_node: int) -> str:
    import torch

    return "nccl" if not cfg.cpu and torch.cuda.is_available() and torch.cuda.device_count() >= per_node else "gloo"


def prepare(cfg: TrainConfig) -> tuple[TrainConfig, Any, Any, Any]:
    """Check everything a run needs before any process starts; returns (resolved config, model, example,
    corpus). Raises ConfigError / ScheduleError with one clear line."""
    check(cfg)
    factory_target(cfg.model)
    from bitpipe_fx.train.data import Batches, load_corpus
    from bitpipe_fx.train.job import build_model, resolve

    model, example = build_model(cfg)
    cfg = resolve(cfg, example)
    corpus = load_corpus(cfg.data, cfg.max_bytes)
    Batches(corpus, cfg.task, cfg.batch_size, cfg.seq_len, cfg.seed)
    check_vocab(model, corpus)
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != cfg.processes:
            raise ConfigError(
                f"torchrun started {world} processes but --devices {cfg.devices} x --data-parallel "
                f"{cfg.data_parallel} needs {cfg.processes}; use --nproc-per-node/--nnodes giving {cfg.processes}"
            )
    check_out(cfg.out, cfg.resume, cfg.overwrite)
    if cfg.overwrite and int(os.environ.get("RANK", "0")) == 0:
        clear_run(cfg.out)
    try:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {cfg.out!r} ({exc}); pass a writable --out") from exc
    return cfg, model, example, corpus


def run(cfg: TrainConfig, command: str = "train") -> int:
    """Check, then train on local processes, under torchrun, or in one process; rank 0 reports."""
    from bitpipe_fx.train.checkpoint import History, check_resume

    torchrun = under_torchrun()
    rank = int(os.environ.get("RANK", "0")) if torchrun else 0
    cfg, model, example, corpus = prepare(cfg)
    start, history = check_resume(cfg) if cfg.resume else (0, History())
    if cfg.record_step is not None and cfg.record_step <= start:
        raise ConfigError(f"--record-step {cfg.record_step} was trained before the checkpoint (step {start}); pass "
                          f"a step in {start + 1}..{cfg.steps} or leave it out")
    say = print if rank == 0 else (lambda *a, **k: None)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.processes)) if torchrun else cfg.processes
    backend = _backend(cfg, per_node)
    say(_header(cfg, command, model, corpus, torchrun, backend, start), flush=True)
    plan_path = None
    if not torchrun:
        from bitpipe_fx.compiler import build_plan

        limit = {} if cfg.memory_limit is None else {"memory_limit": cfg.memory_limit}  # recompute="auto"'s bound
        plan, _ = build_plan(model, example, cfg.schedule, cfg.devices, cfg.microbatches, recompute=cfg.recompute,
                             **limit, **dict(cfg.schedule_options))
        plan_path = str(Path(cfg.out) / "plan.json")
        plan.save(plan_path)
        say(plan.summary(), flush=True)
    del model, example
    from bitpipe_fx.train.trainer import worker

    if cfg.local:
        result = worker(cfg, plan_path, start, history)
    elif torchrun:
        result = _torchrun(cfg, backend, plan_path, start, history)
    else:
        from bitpipe_fx.runtime.launch import launch

        say(f"starting {cfg.processes} local processes ({backend}, {cfg.threads} thread(s) each) ...", flush=True)
        note = cores_note(cfg.devices, cfg.processes, os.cpu_count() or 1, backend, command)
        if note:
            say(note, flush=True)
        result = launch(worker, cfg.processes, backend, (cfg, plan_path, start, history), timeout=cfg.timeout,
                        threads=cfg.threads)[0]
    return finish(cfg, result, start) if rank == 0 else 0


def cores_note(devices: int, processes: int, cores: int, backend: str, command: str) -> str | None:
    """What it means when there are more CPU processes than cores, and (for the demo) why D is kept."""
    if backend != "gloo" or processes <= cores:
        return None
    why = (f"the demo keeps D={devices} so that its pictures show a {devices}-device pipeline; "
           f"--devices {max(2, cores - cores % 2)} fits this machine" if command == "demo"
           else "fewer processes (--devices, --data-parallel) fit this machine")
    return (f"  ({processes} processes on {cores} CPU cores take turns: the measured times include waiting for a "
            f"core; {why})")


def _torchrun(cfg: TrainConfig, backend: str, plan_path: str | None, start: int, history: Any) -> Any:
    import torch.distributed as dist

    from bitpipe_fx.runtime.group import init_group
    from bitpipe_fx.train.trainer import device_for, worker

    device_for(backend, cfg.cpu)
    init_group(backend, cfg.timeout)
    try:
        result = worker(cfg, plan_path, start, history)
        dist.barrier()  # nobody tears down connections a peer is still reading from
        return result
    finally:
        dist.destroy_process_group()


def _header(cfg: TrainConfig, command: str, model: Any, corpus: Any, torchrun: bool, backend: str, start: int) -> str:
    params = sum(p.numel() for p in model.parameters())
    where = (f"{cfg.processes} torchrun processes" if torchrun else "one process (--local)" if cfg.local
             else f"{cfg.processes} local processes")
    schedule = ScheduleSpec(cfg.schedule, cfg.schedule_options)
    rows = cfg.rows_per_microbatch
    lines = [
        f"bitpipe-fx {command}: {type(model).__name__} ({params / 1e6:.2f} M parameters, {cfg.dtype}), task "
        f"{cfg.task}, on {corpus.describe()}",
        f"  schedule {schedule}: D={cfg.devices} devices x data-parallel {cfg.data_parallel}, N={cfg.microbatches} "
        f"micro-batches of {rows} x {cfg.seq_len} bytes; {cfg.optimizer} lr {cfg.lr:g}; steps "
        f"{start + 1}..{cfg.steps}; {where}, {backend}; output {cfg.out}/",
    ]
    return "\n".join(lines)


def finish(cfg: TrainConfig, result: Any, start: int) -> int:
    """Write loss.png, timeline files and metrics.json; print the bubbles and the reference check."""
    from bitpipe_fx.plan import Plan
    from bitpipe_fx.train.report import compare_timelines, plot_losses, write_timeline_files

    out = Path(cfg.out)
    history = result.history
    plan = Plan.from_json(result.plan_json)
    metrics: dict[str, Any] = {"config": cfg.to_dict(), "parameters": result.parameters, **history.to_dict()}
    last_val = history.val[-1][1] if history.val else float("nan")
    tail = history.losses[-10:]
    print(f"done: step {history.step}; train loss {history.losses[0]:.4f} at step 1, {sum(tail) / len(tail):.4f} "
          f"over the last {len(tail)} steps; validation loss {last_val:.4f}; "
          f"median {_median(history.tokens_per_s[start:]):,.0f} tokens/s")
    title = (f"{plan.model} on {Path(cfg.data).name if cfg.data else 'the Python standard library'}: "
             f"{cfg.schedule}, D={cfg.devices}, N={cfg.microbatches}, {cfg.optimizer}")
    written = [plot_losses(out / "loss.png", history.losses, history.val, title)]
    if result.timeline:
        timeline = compare_timelines(plan, result.timeline, result.record_step)
        meta = {"schedule": cfg.schedule, "devices": cfg.devices, "microbatches": cfg.microbatches}
        setting = run_setting(cfg)
        written += write_timeline_files(out, timeline, meta, setting)
        print(timeline.describe(setting))
        metrics["timeline"] = {"step": timeline.step, "measured_bubble": timeline.measured_bubble,
                               "predicted_bubble": timeline.predicted_bubble,
                               "measured_makespan_s": timeline.measured_makespan,
                               "measured_split_s": [astuple(t) for t in timeline.measured_split],
                               "predicted_split_s": [astuple(t) for t in timeline.predicted_split],
                               "split": ["compute", "waiting for communication", "idle"],
                               "measured_in": timeline.measured_figure(setting)}
    status = 0
    if cfg.compare_steps:
        from bitpipe_fx.train.reference import compare

        agreement = compare(cfg, history.losses, cfg.compare_steps)
        print(agreement.describe())
        metrics["reference"] = {"pipelined": agreement.pipelined, "reference": agreement.reference,
                                "max_rel_diff": agreement.max_rel_diff, "agree": agreement.agree}
        status = 0 if agreement.agree else 1
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    names = ", ".join(p.name for p in [*written, out / "metrics.json", out / "plan.json"])
    print(f"wrote {out}/: {names}, checkpoint/ (continue with --resume --steps N)")
    return status


def run_setting(cfg: TrainConfig) -> Setting:
    """How this run's ranks shared the machine (what the measured timeline's waiting means)."""
    from bitpipe_fx.train.report import Setting

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.processes)) if under_torchrun() else cfg.processes
    return Setting(local=cfg.local, processes=per_node, cores=os.cpu_count() or 1,
                   cpu=_backend(cfg, per_node) == "gloo")


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else 0.0


def main(argv: list[str] | None = None) -> int:
    """``bitpipe-fx train`` as a function (what examples/train.py calls)."""
    from bitpipe_fx.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


__all__ = ["DEMO", "add_parser", "config_from_args", "finish", "main", "prepare", "run", "run_setting",
           "under_torchrun"]
