"""Every schedule family simulated on the BitPipe paper's settings, with costs of an H200-class device.

Models (the paper's): GPT-style, 96 layers, hidden 3072, seq 1024 (vocab 50257); BERT-style, 64 layers,
hidden 2560, seq 512 (vocab 30522); one sequence per micro-batch; D = 4, 8, 16, 32; N = D, 2D, 4D.

Costs come from the passes: the example model at full size is built on the meta device in bf16, captured,
and ``estimate_costs`` gives every node's FLOPs and bytes; ``partition`` cuts it for each schedule's
placement (node-granular cuts, so a stage may hold a fraction of a layer), and the stage rows give
F time = FLOPs / (peak x MFU), B = 2F (W = B/2 when a schedule splits it), the bytes each cut sends, the
parameter bytes (all-reduce size, weight memory) and the values a stage computes (activation memory proxy).
Links: one link speed per run; D <= 8 fits one 8-GPU node (NVLink), larger D uses the inter-node
link for every message (a pessimistic bound: most neighbours of a real pipeline share a node).

    python benchmarks/schedules.py            # full settings, ~2-4 min on 2 CPU cores
    python benchmarks/schedules.py --smoke    # tiny model, D = 2, 4
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import Column, machine_info, machine_line, markdown_table, parser, write_results

from bitpipe_fx.errors import BitPipeError
from bitpipe_fx.examples import models
from bitpipe_fx.passes import CostTable, StageCost, capture, estimate_costs, partition
from bitpipe_fx.schedules import Program, generate
from bitpipe_fx.sim import CostModel, SimReport, simulate

FAMILIES = ("gpipe", "1f1b", "interleaved", "zbv", "dualpipev", "chimera", "bitpipe-paper", "bitpipe")
PAPER_BASELINES = ("gpipe", "1f1b", "interleaved", "chimera")  # synchronous schedules that predate BitPipe
PAPER_MODELS = {
    "gpt-96": ("gpt", {"vocab": 50257, "seq": 1024, "dim": 3072, "heads": 24, "layers": 96, "micro_batch": 1}),
    "bert-64": ("bert", {"vocab": 30522, "seq": 512, "dim": 2560, "heads": 32, "layers": 64, "micro_batch": 1}),
}
SMOKE_MODELS = {
    "gpt-8": ("gpt", {"vocab": 256, "seq": 32, "dim": 64, "heads": 2, "layers": 8, "micro_batch": 1}),
    "bert-8": ("bert", {"vocab": 256, "seq": 32, "dim": 64, "heads": 2, "layers": 8, "micro_batch": 1}),
}
GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """What the cost model assumes about one accelerator and its links (seconds, bytes, FLOP/s)."""

    name: str = "H200-class"
    peak_flops: float = 989e12  # dense BF16 tensor-core peak
    mfu: float = 0.5  # fraction of peak a transformer layer's kernels reach
    node_size: int = 8  # GPUs per NVLink domain
    nvlink_bandwidth: float = 450e9  # bytes/s per direction (NVLink 4, 900 GB/s bidirectional)
    nvlink_latency: float = 10e-6
    network_bandwidth: float = 50e9  # bytes/s per GPU across nodes (400 Gb/s NDR InfiniBand)
    network_latency: float = 15e-6
    dtype_bytes: int = 2  # bf16 activations, gradients and weights

    def link(self, devices: int) -> tuple[float, float]:
        """(bandwidth, latency) of the messages of a D-device pipeline."""
        if devices <= self.node_size:
            return self.nvlink_bandwidth, self.nvlink_latency
        return self.network_bandwidth, self.network_latency


def model_costs(kind: str, cfg: dict[str, Any]) -> CostTable:
    """The passes' cost table of an example model at full size, built on the meta device in bf16."""
    factory = {"gpt": models.gpt, "bert": models.bert}[kind]
    with torch.device("meta"):
        model, example = factory(**cfg)
        model = model.to(torch.bfloat16)
    example = tuple(torch.zeros(t.shape, dtype=t.dtype, device="meta") for t in example)
    return estimate_costs(capture(model, example))


def stage_rows(costs: CostTable, program: Program) -> tuple[tuple[StageCost, ...], float]:
    """Partition ``costs`` for the program's placement; returns the stage rows and the device balance."""
    per_pipe = [program.pipe_of.count(p) for p in range(program.pipes)]
    part = partition(costs, program.placement, pipe_microbatches=per_pipe)
    return costs.stages(part.cuts), part.balance


def cost_model(rows: tuple[StageCost, ...], hw: Hardware, devices: int) -> CostModel:
    """Simulator costs in seconds and bytes from the partition's stage rows."""
    rate = hw.peak_flops * hw.mfu
    bandwidth, latency = hw.link(devices)
    forward = tuple(r.flops / rate for r in rows)
    return CostModel(
        forward=forward,
        backward=tuple(2.0 * f for f in forward),
        weight_fraction=0.5,
        activation_bytes=tuple(float(r.bytes_sent) for r in rows),
        param_bytes=tuple(float(r.param_bytes) for r in rows),
        p2p_latency=latency,
        p2p_bandwidth=bandwidth,
        allreduce_latency=latency,
        allreduce_bandwidth=bandwidth,
    )


def peak_stash_bytes(report: SimReport, rows: tuple[StageCost, ...]) -> float:
    """Max over devices of the stored activations: each F holds its stage's computed values until its B or W
    (I keeps what W needs)."""
    peak = 0.0
    for d in range(report.devices):
        changes = []
        for e in report.events:
            if e.device != d:
                continue
            if e.kind == "F":
                changes.append((e.start, 1, rows[e.stage].activation_bytes))
            elif e.kind in ("B", "W"):
                changes.append((e.end, 0, -rows[e.stage].activation_bytes))
        held = 0.0
        for _, _, delta in sorted(changes):
            held += delta
            peak = max(peak, held)
    return peak


def run_setting(model: str, costs: CostTable, devices: int, microbatches: int, hw: Hardware) -> list[dict]:
    """One row per schedule family for one (model, D, N)."""
    rows = []
    for name in FAMILIES:
        row: dict[str, Any] = {"model": model, "devices": devices, "microbatches": microbatches, "schedule": name}
        try:
            program = generate(name, devices, microbatches)
        except BitPipeError as exc:
            rows.append({**row, "skipped": str(exc)})
            continue
        stages, balance = stage_rows(costs, program)
        report = simulate(program, cost_model(stages, hw, devices))
        rows.append({
            **row,
            "stages": program.stages,
            "step_ms": report.makespan * 1e3,
            "bubble": report.bubble_ratio,
            "partition_balance": balance,
            "peak_activation_gb": peak_stash_bytes(report, stages) / GB,
            "weight_gb": max(report.weight_byte_counts) / GB,
            "p2p_gb": report.bytes_moved / GB,
            "p2p_messages": report.messages_cross,
            "local_handoffs": report.local_handoffs,
            "exposed_allreduce_ms": report.exposed_allreduce * 1e3,
        })
    base = next(r for r in rows if r["schedule"] == "1f1b")["step_ms"]
    for r in rows:
        if "step_ms" in r:
            r["throughput_vs_1f1b"] = base / r["step_ms"]
    return rows


def paper_comparison(rows: list[dict]) -> list[dict]:
    """Per (model, D, N): speed-up of bitpipe-paper and bitpipe over the best paper baseline and over all others."""
    out = []
    keys = sorted({(r["model"], r["devices"], r["microbatches"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for key in keys:
        group = {r["schedule"]: r for r in rows if (r["model"], r["devices"], r["microbatches"]) == key and
                 "step_ms" in r}
        best_paper = min((group[n] for n in PAPER_BASELINES if n in group), key=lambda r: r["step_ms"])
        others = [group[n] for n in group if n not in ("bitpipe-paper", "bitpipe")]
        best_any = min(others, key=lambda r: r["step_ms"])
        row = {"model": key[0], "devices": key[1], "microbatches": key[2],
               "best_paper_baseline": best_paper["schedule"], "best_other": best_any["schedule"]}
        for name in ("bitpipe-paper", "bitpipe"):
            if name in group:
                row[f"{name}_vs_paper_baseline"] = best_paper["step_ms"] / group[name]["step_ms"]
                row[f"{name}_vs_best_other"] = best_any["step_ms"] / group[name]["step_ms"]
        out.append(row)
    return out


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}x-{max(values):.2f}x" if values else "-"


def render(payload: dict) -> str:
    """Markdown: assumptions, the throughput matrix, the paper comparison, then every row in full."""
    rows, comparison, hw = payload["rows"], payload["comparison"], payload["hardware"]
    matrix = []
    for c in comparison:
        entry = {k: c[k] for k in ("model", "devices", "microbatches")}
        for r in rows:
            if (r["model"], r["devices"], r["microbatches"]) == (c["model"], c["devices"], c["microbatches"]):
                entry[r["schedule"]] = r.get("throughput_vs_1f1b")
        matrix.append(entry)
    setting = [Column("model", "model"), Column("devices", "D"), Column("microbatches", "N")]
    summary = payload["summary"]
    lines = [
        "## Simulated schedules on the BitPipe paper's settings",
        "",
        machine_line(payload["machine"], verb="Simulated"),
        "",
        f"Hardware assumed: {hw['name']}, {hw['peak_flops'] / 1e12:.0f} TFLOP/s dense BF16 peak at "
        f"{hw['mfu']:.0%} MFU; D <= {hw['node_size']}: NVLink {hw['nvlink_bandwidth'] / 1e9:.0f} GB/s, "
        f"{hw['nvlink_latency'] * 1e6:.0f} us per message; D > {hw['node_size']}: every message and all-reduce at "
        f"{hw['network_bandwidth'] / 1e9:.0f} GB/s, {hw['network_latency'] * 1e6:.0f} us (inter-node, pessimistic); "
        f"bf16 ({hw['dtype_bytes']} B) activations, gradients, weights. Costs: the passes' cost table of the full "
        "model (FLOPs per node), cut by the passes' partitioner for each schedule's placement; B = 2F, W = B/2. "
        "One sequence per micro-batch; no data parallelism.",
        "",
        "### Throughput relative to 1f1b (same N micro-batches per step; higher is better)",
        "",
        markdown_table(matrix, [*setting, *(Column(n, n, ".3f") for n in FAMILIES)]),
        "",
        "### bitpipe-paper and bitpipe against the best other schedule of the same setting",
        "",
        f"The BitPipe paper reports 1.05x-1.28x over the best synchronous schedules it compared. This simulation "
        f"gives bitpipe-paper {_span(summary['bitpipe-paper_vs_paper_baseline'])} and bitpipe "
        f"{_span(summary['bitpipe_vs_paper_baseline'])} over the best of {', '.join(PAPER_BASELINES)}; against "
        f"every other family (adding zbv, dualpipev): bitpipe-paper {_span(summary['bitpipe-paper_vs_best_other'])},"
        f" bitpipe {_span(summary['bitpipe_vs_best_other'])}.",
        "",
        markdown_table(comparison, [
            *setting, Column("best_paper_baseline", "best of paper's baselines"),
            Column("bitpipe-paper_vs_paper_baseline", "bitpipe-paper vs it", ".3f"),
            Column("bitpipe_vs_paper_baseline", "bitpipe vs it", ".3f"),
            Column("best_other", "best other"),
            Column("bitpipe-paper_vs_best_other", "bitpipe-paper vs it", ".3f"),
            Column("bitpipe_vs_best_other", "bitpipe vs it", ".3f"),
        ]),
        "",
        "### Every schedule in full",
        "",
        "Bubble = mean idle / step time. Peak activations = the most bytes of stored stage values one device "
        "holds (each F's computed values, kept until its B, or W when split). Weights = the most parameter bytes "
        "on one device (bitpipe and chimera hold two replicas). p2p = bytes of all cross-device messages. "
        "Exposed all-reduce = replica gradient all-reduce time left after a device's last compute (single-pipe "
        "schedules have none without data parallelism).",
        "",
        markdown_table(rows, [
            *setting, Column("schedule", "schedule"), Column("step_ms", "step ms", ".1f"),
            Column("throughput_vs_1f1b", "vs 1f1b", ".3f"), Column("bubble", "bubble", ".3f"),
            Column("peak_activation_gb", "peak act GB", ".2f"), Column("weight_gb", "weights GB", ".2f"),
            Column("p2p_gb", "p2p GB", ".2f"), Column("p2p_messages", "msgs"),
            Column("exposed_allreduce_ms", "exposed AR ms", ".2f"), Column("partition_balance", "balance", ".3f"),
        ]),
    ]
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines += ["", "Not run: " + "; ".join(
            f"{r['schedule']} at D={r['devices']}, N={r['microbatches']} ({r['skipped']})" for r in skipped)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--mfu", type=float, default=Hardware.mfu, help="fraction of peak FLOP/s reached")
    args = p.parse_args(argv)
    hw = Hardware(mfu=args.mfu)
    configs = SMOKE_MODELS if args.smoke else PAPER_MODELS
    device_counts = (2, 4) if args.smoke else (4, 8, 16, 32)
    started = time.perf_counter()
    rows: list[dict] = []
    for model, (kind, cfg) in configs.items():
        costs = model_costs(kind, cfg)
        for devices in device_counts:
            for microbatches in (devices, 2 * devices, 4 * devices):
                rows.extend(run_setting(model, costs, devices, microbatches, hw))
                print(f"{model} D={devices} N={microbatches}: {time.perf_counter() - started:.0f} s", flush=True)
    comparison = paper_comparison(rows)
    summary = {key: [c[key] for c in comparison if key in c] for key in (
        "bitpipe-paper_vs_paper_baseline", "bitpipe_vs_paper_baseline",
        "bitpipe-paper_vs_best_other", "bitpipe_vs_best_other")}
    payload = {
        "benchmark": "schedules",
        "smoke": args.smoke,
        "machine": machine_info(),
        "hardware": asdict(hw),
        "models": {name: {"kind": kind, **cfg} for name, (kind, cfg) in configs.items()},
        "families": list(FAMILIES),
        "paper_baselines": list(PAPER_BASELINES),
        "rows": rows,
        "comparison": comparison,
        "summary": summary,
        "seconds": time.perf_counter() - started,
    }
    json_path, md_path = write_results(args.out, "schedules", payload, render(payload))
    print(f"wrote {json_path} and {md_path} in {payload['seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
