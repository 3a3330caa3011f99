"""Shared helpers of the benchmark scripts: machine info, timing, peak memory, JSON + markdown output.

The scripts are run as files (``python benchmarks/<name>.py``), so this module is imported as ``_common``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Column:
    """One markdown column: the row key, its header and a format spec (``""`` = str())."""

    key: str
    header: str
    fmt: str = ""


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--smoke`` (tiny sizes, for CI) and ``--out`` (results folder)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs, measures nothing")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the JSON and markdown (default {RESULTS})")
    return p


def machine_info() -> dict[str, Any]:
    """Where and when a result was measured: host, CPU, load, library versions, accelerator."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"model name\s*:\s*(.+)", text)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def time_steps(step: Callable[[], Any], warmup: int, steps: int, sync: Callable[[], None] = lambda: None
               ) -> list[float]:
    """Wall time in seconds of each of ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def reset_peak_memory() -> None:
    """Start a new high-water mark: CUDA's max-allocated counter, or the process's peak RSS (Linux)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_memory() -> tuple[str, int]:
    """(what was measured, bytes): CUDA max allocated on GPU, else the RSS high-water mark since the last reset."""
    import torch

    if torch.cuda.is_available():
        return "cuda_max_allocated", int(torch.cuda.max_memory_allocated())
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        match = None
    if match:
        return "rss_high_water", int(match.group(1)) * 1024
    import resource

    return "rss_high_water_lifetime", int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_now() -> int:
    """Bytes in use now: CUDA allocated on GPU, else the process's resident set size (0 when unknown)."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    try:
        match = re.search(r"VmRSS:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
    except OSError:
        return 0
    return int(match.group(1)) * 1024 if match else 0


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub markdown table of ``rows``; a missing or None cell prints as ``-``."""

    def cell(row: dict[str, Any], col: Column) -> str:
        value = row.get(col.key)
        if value is None:
            return "-"
        if col.fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
            return format(value, col.fmt)
        return str(value)

    head = "| " + " | ".join(c.header for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_results(out: Path, name: str, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out>/<name>.json`` (payload) and ``<out>/<name>.md`` (markdown); returns both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def machine_line(info: dict[str, Any], verb: str = "Measured") -> str:
    """One markdown line naming the date, machine and load of a run."""
    where = info.get("gpu") or f"{info['cpus']} x {info['cpu']}"
    return (f"{verb} {info['date']} on {where}, torch {info['torch']}, Python {info['python']}; "
            f"load average at start {info['load_average_1_5_15']}.")
