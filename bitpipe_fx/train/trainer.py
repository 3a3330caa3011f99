"""The body of every rank of a training run: compile, train with progress and validation, checkpoint.

Every rank runs the same loop (each holding its stages); losses come back all-reduced, so every rank
keeps the same history and rank 0 alone prints and returns it. Order within step k, which keeps a resumed
run identical to an uninterrupted one: train; validate when k is a multiple of ``eval_every``; save when
due; then, at the last step only, a final validation (after the save, so it never shapes a checkpoint:
Schedule-Free's switch to the averaged weights and back is not bit-exact).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import bitpipe_fx as bp
from bitpipe_fx.sim.trace import TraceEvent
from bitpipe_fx.train import checkpoint
from bitpipe_fx.train.checkpoint import History
from bitpipe_fx.train.data import Batches, Rows, load_corpus, to_device
from bitpipe_fx.train.job import TrainConfig, build_model, loss_fn, optimizer_factory


@dataclass(frozen=True)
class RankResult:
    """What rank 0 hands back: the whole history, the recorded step's timeline and the plan it ran."""

    history: History
    record_step: int
    timeline: tuple[TraceEvent, ...]
    plan_json: str
    parameters: int


def record_step(cfg: TrainConfig, start: int) -> int:
    """The step whose timeline is recorded: the third of this run (warmed up), or its last."""
    return cfg.record_step if cfg.record_step is not None else min(cfg.steps, start + 3)


def device_for(backend: str | None, cpu: bool) -> torch.device:
    """cuda:LOCAL_RANK on an NCCL run, else the CPU."""
    if backend == "nccl" and not cpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class Progress:
    """tqdm bar on a terminal; on anything else, one plain line per validation (no carriage-return spam)
    with the mean training loss and the median tokens/s of the steps since the previous line."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled, self.total = enabled, total
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self.t0, self.start = time.perf_counter(), start
        if self.tty:
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=0.25)
        self.last = ""
        self.recent: list[tuple[float, float]] = []  # (loss, tokens/s) of the steps since the last line

    def step(self, k: int, loss: float, tokens_per_s: float) -> None:
        self.recent.append((loss, tokens_per_s))
        self.last = f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s"
        if self.bar is not None:
            self.bar.set_postfix_str(self.last, refresh=False)
            self.bar.update(1)

    def write(self, k: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"step {k}: {text}")
            return
        done = k - self.start
        eta = (time.perf_counter() - self.t0) / done * (self.total - k) if done else 0.0
        losses, speeds = zip(*self.recent) if self.recent else ((float("nan"),), (0.0,))
        self.recent = []
        print(f"step {k:>5}/{self.total}  train loss {sum(losses) / len(losses):.4f}  {text}  "
              f"{sorted(speeds)[len(speeds) // 2]:7,.0f} tok/s  ETA {eta:4.0f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rank() -> tuple[int, int, str | None]:
    """(rank, world size, backend) of this process; (0, 1, None) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
    return 0, 1, None


def _slice(batch: Rows, index: int, parts: int) -> Rows:
    """This data-parallel rank's rows of a global batch."""
    if isinstance(batch, torch.Tensor):
        return batch.tensor_split(parts)[index]
    return type(batch)(_slice(b, index, parts) for b in batch)


def _thread_lock_for_tqdm() -> None:
    """Give tqdm (also used inside torch.fx) a thread lock: its default multiprocessing lock is a semaphore
    that leaks, with a warning at exit, when the launcher ends a rank with os._exit."""
    tqdm.set_lock(threading.RLock())


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random-number state a resumed run needs (dropout): CPU, and the GPU's on a CUDA rank."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def tag_warnings(rank: int) -> None:
    """Prefix the warnings of ranks other than 0 with their rank (rank 0 alone prints the plan and progress)."""
    if rank == 0:
        return
    plain = warnings.formatwarning

    def tagged(message: Warning | str, category: type[Warning], filename: str, lineno: int,
               line: str | None = None) -> str:
        return f"[rank {rank}] {plain(message, category, filename, lineno, line)}"

    warnings.formatwarning = tagged


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def worker(cfg: TrainConfig, plan_path: str | None, start: int, history: History) -> RankResult | None:
    """Train ``cfg`` from step ``start`` (loading its checkpoint when > 0); rank 0 returns the result."""
    _thread_lock_for_tqdm()
    torch.set_num_threads(cfg.threads)
    rank, _, backend = _rank()
    tag_warnings(rank)
    device = device_for(backend, cfg.cpu)
    torch.manual_seed(cfg.seed)
    model, example = build_model(cfg)
    model, example = model.to(device), to_device(example, device)
    parameters = sum(p.numel() for p in model.parameters())
    batches = Batches(load_corpus(cfg.data, cfg.max_bytes), cfg.task, cfg.batch_size, cfg.seq_len, cfg.seed)
    pipe = bp.compile(model, example, loss_fn, cfg.schedule, cfg.devices, cfg.microbatches,
                      optimizer=optimizer_factory(cfg), data_parallel=cfg.data_parallel, plan=plan_path,
                      timeout=cfg.timeout, seed=cfg.seed, on_nonfinite=cfg.on_nonfinite,
                      shard_optimizer=cfg.shard_optimizer, precision=cfg.precision, recompute=cfg.recompute,
                      memory_limit=cfg.memory_limit, **dict(cfg.schedule_options))
    del model
    pipe.train()
    if rank == 0 and plan_path is None:
        pipe.plan.save(Path(cfg.out) / "plan.json")
        print(pipe.plan.summary(), flush=True)
    if start:
        extra = pipe.load_checkpoint(checkpoint.step_dir(cfg.out, start), extra=(checkpoint.rng_key(rank),))
        if extra:  # a rank of a run resharded onto more ranks keeps its seeded state
            _set_rng_state(extra[checkpoint.rng_key(rank)], device)
        pipe.steps_taken = start  # step k draws from the keys of step k-1, resumed or not (runtime.rng)
    dp_index = rank // cfg.devices if pipe.distributed else 0

    def batch(data: Rows) -> Rows:
        return to_device(_slice(data, dp_index, cfg.data_parallel), device)

    val_batches = [(batch(x), batch(y)) for x, y in batches.validation(cfg.eval_batches)]
    recorded, timeline = record_step(cfg, start), ()
    progress = Progress(cfg.steps, start, rank == 0)
    tokens = cfg.batch_size * cfg.seq_len

    def validate(k: int) -> None:
        pipe.eval()
        loss = sum(pipe.evaluate(x, y) for x, y in val_batches) / len(val_batches)
        pipe.train()
        history.val.append((k, loss))
        progress.write(k, f"validation loss {loss:.4f}")

    for k in range(start + 1, cfg.steps + 1):
        inputs, targets = batches.train(k)
        t0 = time.perf_counter()
        skipped = pipe.skipped_steps
        loss = pipe.step(batch(inputs), batch(targets), record=k == recorded)  # NonFiniteError: no checkpoint
        elapsed = time.perf_counter() - t0
        if pipe.skipped_steps > skipped:
            history.skipped.append(k)
        history.losses.append(loss)
        history.tokens_per_s.append(tokens / elapsed)
        progress.step(k, loss, tokens / elapsed)
        if k == recorded:
            timeline = tuple(pipe.last_timeline)
        if k % cfg.eval_every == 0:
            validate(k)
        if (cfg.save_every and k % cfg.save_every == 0) or k == cfg.steps:
            partial = checkpoint.partial_dir(cfg.out, k)
            if rank == 0 and partial.exists():  # left by an interrupted save: start the folder clean
                shutil.rmtree(partial)
            _barrier()
            pipe.save_checkpoint(partial, extra={checkpoint.rng_key(rank): _rng_state(device)})
            _barrier()
            if rank == 0:
                checkpoint.commit(cfg.out, k, cfg, history)
        if k == cfg.steps and k % cfg.eval_every:
            validate(k)
    progress.close()
    if rank != 0:
        return None
    return RankResult(history, recorded, timeline, pipe.plan.to_json(), parameters)
