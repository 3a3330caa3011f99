"""Run a function (or a script) in N local processes with torch.distributed initialised, like torchrun.

The parent owns the rendezvous store (127.0.0.1, a port the OS picks, so parallel launches never clash),
watches every child's result pipe and exit, and on the first failure gives the others ``grace`` seconds to
end by themselves (the runtime's bounded waits make them raise PipelineRuntimeError) before killing them.
It then raises ``LaunchError`` carrying the first failure's traceback (a rank's own error ranks before the
PipelineRuntimeErrors it caused in its peers) and every rank's outcome.

    python -m bitpipe_fx.runtime.launch --nprocs 4 train.py --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import runpy
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bitpipe_fx.errors import ConfigError, PipelineRuntimeError, Terminated
from bitpipe_fx.runtime.group import init_group


class LaunchError(PipelineRuntimeError):
    """A launched rank raised or died; ``first_rank`` failed first, ``outcomes`` has every rank's story."""

    def __init__(self, message: str, first_rank: int, tracebacks: dict[int, str], errors: dict[int, str],
                 exitcodes: dict[int, int | None]) -> None:
        super().__init__(message)
        self.first_rank, self.tracebacks, self.errors, self.exitcodes = first_rank, tracebacks, errors, exitcodes


def _worker(fn: Callable[..., object], rank: int, nprocs: int, backend: str, port: int, args: tuple,
            timeout: float, threads: int, conn: Connection) -> None:
    """Child body: join the group, run ``fn(*args)``, report ("ok", pickled result) or ("error", ...)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, nprocs, is_master=False, timeout=timedelta(seconds=timeout))
        init_group(backend, timeout, store, rank, nprocs)
        result = fn(*args)
        payload = pickle.dumps(result)
    except BaseException as exc:  # report anything, including SystemExit from a script
        conn.send(("error", traceback.format_exc(), type(exc).__name__))
        conn.close()
        os._exit(1)
    conn.send(("ok", payload, None))
    conn.close()
    try:
        dist.barrier()  # nobody tears down connections a peer is still reading from
        dist.destroy_process_group()
    except BaseException:  # a peer failed after this rank finished: its error is reported, not this one
        os._exit(0)


def launch(
    fn: Callable[..., object],
    nprocs: int,
    backend: str = "gloo",
    args: Sequence[object] = (),
    timeout: float = 60.0,
    threads: int = 1,
    grace: float | None = None,
    join_timeout: float | None = None,
) -> list[object]:
    """Run ``fn(*args)`` on ranks 0..nprocs-1 (``dist`` initialised); returns the results by rank.

    ``fn`` must be importable (a module-level function). ``timeout`` is the process-group timeout;
    after the first failure the others get ``grace`` seconds (default timeout + 10) before being killed;
    ``join_timeout`` bounds the whole run. Raises ``LaunchError`` on any failure.
    """
    for name, value in (("nprocs", nprocs), ("threads", threads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("timeout", timeout), ("grace", grace), ("join_timeout", join_timeout)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or value == float("inf")):
            raise ConfigError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    if not callable(fn):
        raise ConfigError(f"fn must be a module-level function to run on every rank, got {fn!r}")
    grace = timeout + 10.0 if grace is None else grace
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=timedelta(seconds=timeout), wait_for_workers=False)
    procs, readers = [], {}
    for rank in range(nprocs):
        reader, writer = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(fn, rank, nprocs, backend, store.port, tuple(args), timeout,
                                              threads, writer), name=f"bitpipe-rank{rank}")
        p.start()
        writer.close()
        procs.append(p)
        readers[rank] = reader
    try:
        with _sigterm_raises():
            return _watch(procs, readers, grace, join_timeout)
    finally:  # also on Ctrl-C or SIGTERM: no rank outlives the launcher (within STOP_BOUND seconds)
        _stop(procs)
        del store


STOP_BOUND = 6.0  # seconds: every rank is asked to stop (SIGTERM), then killed (SIGKILL) after half of it


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM to the launcher raises Terminated (as SIGINT raises KeyboardInterrupt), so its ranks are stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(procs: list[BaseProcess]) -> None:
    """Terminate every live rank at once, then kill those still alive after STOP_BOUND / 2 seconds."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_BOUND / 2
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=STOP_BOUND / 2)


def _watch(procs: list[BaseProcess], readers: dict[int, Connection], grace: float,
           join_timeout: float | None) -> list[object]:
    results: dict[int, object] = {}
    tracebacks: dict[int, str] = {}
    errors: dict[int, str] = {}
    order: list[int] = []  # failing ranks, first failure first
    start = time.monotonic()
    kill_at: float | None = None
    live = set(range(len(procs)))
    while live:
        ready = wait([readers[r] for r in live] + [procs[r].sentinel for r in live], timeout=0.2)
        for rank in sorted(live):
            reader, proc = readers[rank], procs[rank]
            if reader not in ready and proc.sentinel not in ready:
                continue
            report = None
            if reader.poll():
                with contextlib.suppress(EOFError):  # EOF: died without reporting; the exit code says how
                    report = reader.recv()
            if report is not None and report[0] == "ok":
                results[rank] = pickle.loads(report[1])
            elif report is not None:
                tracebacks[rank], errors[rank] = report[1], report[2]
                order.append(rank)
            else:
                proc.join(timeout=5)
                tracebacks[rank] = f"rank {rank} exited with code {proc.exitcode} without reporting\n"
                errors[rank] = f"exit code {proc.exitcode}"
                order.append(rank)
            live.discard(rank)
        now = time.monotonic()
        if order and kill_at is None:
            kill_at = now + grace
        timed_out = join_timeout is not None and now - start > join_timeout
        if live and ((kill_at is not None and now > kill_at) or timed_out):
            why = "killed: the whole run exceeded join_timeout" if timed_out else "killed after the first failure"
            for rank in sorted(live):
                _kill(procs[rank])
                tracebacks[rank], errors[rank] = why + "\n", "killed"
                order.append(rank)
            live.clear()
    for p in procs:
        p.join(timeout=5)
    if order:
        # a rank's own error before the PipelineRuntimeErrors it caused in its peers, kills last
        order.sort(key=lambda r: (errors[r] == "killed", errors[r] == "PipelineRuntimeError"))
        first = order[0]
        others = ", ".join(f"rank {r}: {errors[r]}" for r in order[1:]) or "none"
        raise LaunchError(
            f"rank {first} failed first ({errors[first]}); other failures: {others}\n"
            f"--- traceback of rank {first} ---\n{tracebacks[first]}",
            first, tracebacks, errors, {r: procs[r].exitcode for r in range(len(procs))},
        )
    return [results[r] for r in range(len(procs))]


def _kill(proc: BaseProcess) -> None:
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=3)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout=3)


def _run_script(path: str, argv: list[str]) -> None:
    """Run a script as ``__main__`` in a launched rank (the command-line form)."""
    sys.argv = [path, *argv]
    runpy.run_path(path, run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    """``python -m bitpipe_fx.runtime.launch --nprocs N script.py [args]``: exit 1 and the first traceback."""
    parser = argparse.ArgumentParser(prog="python -m bitpipe_fx.runtime.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--nprocs", type=int, required=True)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    try:
        launch(_run_script, ns.nprocs, ns.backend, (os.path.abspath(ns.script), ns.args), ns.timeout, ns.threads)
    except LaunchError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
