"""Time one optimizer step of bitpipe_fx's fused optimizers against torch and the schedulefree package.

All optimizers step the same transformer-shaped parameter list (by default 1.316 B parameters
in 292 tensors, as in DESIGN.md); the device copy bandwidth is measured in the same run and
gives each optimizer's floor (the bytes it must move at copy speed). Before timing, the run
checks the fused optimizers against the schedulefree package and torch.optim.AdamW (+LambdaLR)
on the same device. On CUDA it also steps one tensor of more than 2^31 elements (int64 offsets)
and, with --sweep, times the Schedule-Free AdamW kernel under several launch configurations.

    python benchmarks/optimizer_step.py            # CUDA if present, else a small CPU run
    python benchmarks/optimizer_step.py --smoke    # tiny, for tests

Writes <out>/optimizer_step_<device>.json and .md.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

import bitpipe_fx.optim as bpo
from bitpipe_fx.kernels import GroupKernel, Profile, sf_adamw
from bitpipe_fx.kernels import scalars as S

PRESETS = {  # hidden, layers, vocab, positions
    "gpt-1.3b": (2048, 24, 50304, 2048),  # 1.316 B parameters, 292 tensors
    "cpu-small": (256, 4, 8192, 512),
    "smoke": (64, 2, 512, 64),
}


def transformer_shapes(hidden: int, layers: int, vocab: int, positions: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model: embeddings, 12 tensors per block, final norm (12·layers + 4)."""
    h = hidden
    block = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,)]
    return [(vocab, h), (positions, h), *block * layers, (h,), (h,)]


def bytes_per_param(name: str, dtype: torch.dtype) -> int:
    """The floor's traffic per parameter: each tensor read once and each updated tensor written once."""
    p = torch.empty((), dtype=dtype).element_size()
    state = 4 if dtype != torch.float64 else 8
    n_state = 1 if "SGD" in name else 2
    return 2 * p + p + 2 * state * n_state  # y read+write, g read, each state tensor read+write


class Timer:
    """Per-step times: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn: Callable[[], Any], warmup: int, iters: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return float(sorted(times)[len(times) // 2])


def copy_bandwidth(device: torch.device, nbytes: int, timer: Timer, iters: int) -> float:
    """Device copy bandwidth in GB/s: (read + write bytes) / time of dst.copy_(src)."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src), warmup=3, iters=iters)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def make_params(shapes, device, dtype, seed=0) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """Parameters and fixed gradients with the given shapes."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype, generator=g) * 0.02) for s in shapes]
    grads = [torch.randn(s, device=device, dtype=dtype, generator=g) * 0.01 for s in shapes]
    return params, grads


def peers(device: torch.device, sf_lr: float) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    """Every optimizer timed, by row name (fused ones first)."""
    import schedulefree

    table: dict[str, Callable[[list], torch.optim.Optimizer]] = {
        "bitpipe_fx ScheduleFreeAdamW": lambda ps: bpo.ScheduleFreeAdamW(ps, lr=sf_lr, warmup_steps=10),
        "bitpipe_fx ScheduleFreeSGD": lambda ps: bpo.ScheduleFreeSGD(ps, lr=sf_lr, warmup_steps=10),
        "bitpipe_fx AdamW (rex profile)": lambda ps: bpo.AdamW(ps, lr=sf_lr, lr_profile="rex", total_steps=1000,
                                                               warmup_steps=10),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=sf_lr, foreach=True),
        "schedulefree AdamWScheduleFree": lambda ps: schedulefree.AdamWScheduleFree(ps, lr=sf_lr, warmup_steps=10),
        "schedulefree SGDScheduleFree": lambda ps: schedulefree.SGDScheduleFree(ps, lr=sf_lr, warmup_steps=10),
    }
    if device.type == "cuda":
        table["torch AdamW fused"] = lambda ps: torch.optim.AdamW(ps, lr=sf_lr, fused=True)
    return table


RATIOS = [  # (ours, peer): ratio = peer ms / ours ms, > 1 means ours is faster
    ("bitpipe_fx ScheduleFreeAdamW", "torch AdamW fused"),
    ("bitpipe_fx ScheduleFreeAdamW", "torch AdamW foreach"),
    ("bitpipe_fx ScheduleFreeAdamW", "schedulefree AdamWScheduleFree"),
    ("bitpipe_fx ScheduleFreeAdamW", "schedulefree SGDScheduleFree"),
    ("bitpipe_fx ScheduleFreeSGD", "schedulefree SGDScheduleFree"),
    ("bitpipe_fx AdamW (rex profile)", "torch AdamW fused"),
    ("bitpipe_fx AdamW (rex profile)", "torch AdamW foreach"),
]


def time_all(shapes, device, dtype, timer: Timer, warmup: int, iters: int, copy_gbps: float) -> list[dict]:
    """One row per optimizer: ms per step, effective GB/s and % of the copy-bandwidth floor."""
    params, grads = make_params(shapes, device, dtype)
    n = sum(p.numel() for p in params)
    rows = []
    for name, factory in peers(device, 1e-3).items():
        for p, g in zip(params, grads):
            p.grad = g
        opt = factory(params)
        if hasattr(opt, "train"):
            opt.train()
        ms = timer.median_ms(opt.step, warmup, iters)
        traffic = bytes_per_param(name, dtype) * n
        floor_ms = traffic / (copy_gbps * 1e9) * 1e3
        rows.append({"optimizer": name, "ms": ms, "gbps": traffic / (ms * 1e-3) / 1e9,
                     "bytes_per_param": bytes_per_param(name, dtype), "floor_ms": floor_ms,
                     "pct_of_floor": 100 * floor_ms / ms})
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Speed-up of each fused optimizer over each peer measured in this run."""
    ms = {r["optimizer"]: r["ms"] for r in rows}
    return [{"ours": a, "peer": b, "speedup": ms[b] / ms[a]} for a, b in RATIOS if a in ms and b in ms]


# ------------------------------------------------------------------------------------------ correctness
def _max_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    """Worst absolute and relative (|a-b| / max(|b|, 1e-6)) error over tensor lists."""
    abs_err = max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))
    rel_err = max(float(((x.double() - y.double()).abs() / y.double().abs().clamp_min(1e-6)).max())
                  for x, y in zip(a, b))
    return {"max_abs": abs_err, "max_rel": rel_err}


def _run(factory, shapes, device, steps, grad_seed=1, scheduler=None):
    params, _ = make_params(shapes, device, torch.float32)
    opt = factory(params)
    sched = scheduler(opt) if scheduler else None
    if hasattr(opt, "train"):
        opt.train()
    g = torch.Generator(device=device).manual_seed(grad_seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, device=device, generator=g)
        opt.step()
        if sched:
            sched.step()
    out = {}
    if hasattr(opt, "eval"):
        opt.eval()
        out["x"] = [p.detach().clone() for p in params]
        opt.train()
        out["z"] = [opt.state[p]["z"].clone() for p in params]
    out["y"] = [p.detach().clone() for p in params]
    return out


def check(device: torch.device, steps: int) -> dict[str, Any]:
    """Fused optimizers vs schedulefree (x after eval, y after train, z) and vs torch AdamW + LambdaLR (params)."""
    import schedulefree

    shapes = [(1,), (5, 3), (4095,), (4097,), *transformer_shapes(*PRESETS["smoke"])[:6]]
    kw = dict(lr=2e-2, weight_decay=0.03, warmup_steps=15, r=0.5, weight_lr_power=1.5)
    pairs = {
        "ScheduleFreeAdamW vs AdamWScheduleFree": (
            lambda ps: bpo.ScheduleFreeAdamW(ps, betas=(0.85, 0.98), **kw),
            lambda ps: schedulefree.AdamWScheduleFree(ps, betas=(0.85, 0.98), **kw), None),
        "ScheduleFreeSGD vs SGDScheduleFree": (
            lambda ps: bpo.ScheduleFreeSGD(ps, momentum=0.85, **kw),
            lambda ps: schedulefree.SGDScheduleFree(ps, momentum=0.85, **kw), None),
    }
    profile = bpo.LRProfile("rex", total_steps=steps, warmup_steps=steps // 6, min_lr=1e-4)
    pairs["AdamW(rex) vs torch AdamW + LambdaLR"] = (
        lambda ps: bpo.AdamW(ps, lr=1e-2, lr_profile=profile),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2), lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: profile.lr(k, 1e-2) / 1e-2))
    result = {}
    for name, (ours, ref, sched) in pairs.items():
        a, b = _run(ours, shapes, device, steps), _run(ref, shapes, device, steps, scheduler=sched)
        errs = {key: _max_err(a[key], b[key]) for key in b}
        ok = all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for key in b for x, y in zip(a[key], b[key]))
        result[name] = {"steps": steps, "pass_rtol_1e-5_atol_1e-6": ok, **errs}
    return result


def int64_check(device: torch.device) -> dict[str, Any]:
    """One Schedule-Free AdamW step on a tensor of 2^31 + 4097 elements: the tail must move like the head."""
    n = 2**31 + 4097
    need = 4 * n * 4 + (1 << 30)
    if device.type != "cuda" or torch.cuda.mem_get_info()[0] < need:
        return {"skipped": f"needs CUDA with {need / 2**30:.0f} GiB free"}
    p = torch.nn.Parameter(torch.ones(n, device=device))
    p.grad = torch.full((n,), 0.5, device=device)
    opt = bpo.ScheduleFreeAdamW([p], lr=1e-2)
    opt.train()
    opt.step()
    z = opt.state[p]["z"]
    idx = torch.tensor([0, 2**31 - 1, 2**31, 2**31 + 1, n - 1], device=device)
    ys, zs = p.detach()[idx].tolist(), z[idx].tolist()
    ok = ys[0] != 1.0 and len(set(ys)) == 1 and len(set(zs)) == 1
    del p, opt, z
    torch.cuda.empty_cache()
    return {"elements": n, "pass": ok, "y_at": ys, "z_at": zs}


def sweep(shapes, device, copy_gbps: float, timer: Timer, iters: int) -> list[dict]:
    """The Schedule-Free AdamW kernel under several (BLOCK, num_warps): pick the default from this table."""
    params, grads = make_params(shapes, device, torch.float32)
    rows_in = [(p.detach(), g, p.detach().clone(), torch.zeros_like(p)) for p, g in zip(params, grads)]
    n = sum(p.numel() for p in params)
    out = []
    for block, warps in [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]:
        gk = GroupKernel(sf_adamw, Profile.CONSTANT, device, "triton", block=block, num_warps=warps)
        gk.set_inputs({S.BETA1: 0.9, S.BETA2: 0.999, S.EPS: 1e-8, S.WARMUP: 10, S.WLR_POWER: 2.0,
                       S.EVAL_W: 1 - 1 / 0.9, S.TRAIN_W: 0.1, S.REX_D: 0.5}, 1e-3)
        ms = timer.median_ms(lambda gk=gk: gk.step(rows_in), 3, iters)
        floor_ms = 28 * n / (copy_gbps * 1e9) * 1e3
        out.append({"block": block, "num_warps": warps, "ms": ms, "pct_of_floor": 100 * floor_ms / ms})
    return out


# ------------------------------------------------------------------------------------------ main
COLUMNS = [_common.Column("optimizer", "optimizer"), _common.Column("ms", "ms / step", ".3f"),
           _common.Column("gbps", "GB/s", ".0f"), _common.Column("bytes_per_param", "B / param"),
           _common.Column("floor_ms", "floor ms", ".3f"), _common.Column("pct_of_floor", "% of floor", ".1f")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="parameter list (default gpt-1.3b on CUDA, cpu-small on CPU, smoke with --smoke)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--check-steps", type=int, default=None)
    p.add_argument("--sweep", action="store_true", help="CUDA: also time SF-AdamW kernel launch configurations")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    preset = args.preset or ("smoke" if args.smoke else "gpt-1.3b" if cuda else "cpu-small")
    iters = args.iters or (3 if args.smoke else 20)
    check_steps = args.check_steps or (20 if args.smoke else 120)
    dtype = getattr(torch, args.dtype)
    timer = Timer(device)
    shapes = transformer_shapes(*PRESETS[preset])
    n = sum(math.prod(s) for s in shapes)

    copy_bytes = min(max(n * 4, 1 << 24), 4 << 30)
    copy_gbps = copy_bandwidth(device, copy_bytes, timer, iters)
    print(f"device {device} ({_common.machine_info()['gpu'] or 'cpu'}): copy bandwidth {copy_gbps:.1f} GB/s")
    checks = check(device, check_steps)
    for name, c in checks.items():
        print(f"check {name}: {'PASS' if c['pass_rtol_1e-5_atol_1e-6'] else 'FAIL'} "
              + ", ".join(f"{k} max abs {v['max_abs']:.2e} rel {v['max_rel']:.2e}" for k, v in c.items()
                          if isinstance(v, dict)))
    big = int64_check(device) if not args.smoke else {"skipped": "--smoke"}
    print(f"int64 offsets: {big}")
    rows = time_all(shapes, device, dtype, timer, warmup=2 if args.smoke else 5, iters=iters, copy_gbps=copy_gbps)
    speedups = ratios(rows)
    swept = sweep(shapes, device, copy_gbps, timer, iters) if args.sweep and cuda else []

    table = _common.markdown_table(rows, COLUMNS)
    ratio_table = _common.markdown_table(speedups, [_common.Column("ours", "fused"), _common.Column("peer", "peer"),
                                                    _common.Column("speedup", "peer ms / fused ms", ".2f")])
    print(table, ratio_table, sep="\n\n")
    info = _common.machine_info()
    md = "\n\n".join([
        f"## Optimizer step: {n / 1e9:.3f} B parameters in {len(shapes)} tensors ({preset}, {args.dtype}, {device})",
        _common.machine_line(info),
        f"Copy bandwidth {copy_gbps:.1f} GB/s (read + write of a {copy_bytes / 2**30:.2f} GiB buffer); "
        f"floor = bytes per parameter × parameters / copy bandwidth.",
        table, ratio_table,
        "Correctness in the same run: " + "; ".join(
            f"{k}: {'pass' if v['pass_rtol_1e-5_atol_1e-6'] else 'FAIL'}" for k, v in checks.items()),
        f"int64 offsets (one tensor over 2^31 elements): {big}",
        *([_common.markdown_table(swept, [_common.Column("block", "BLOCK"), _common.Column("num_warps", "warps"),
                                         _common.Column("ms", "ms", ".3f"),
                                         _common.Column("pct_of_floor", "% of floor", ".1f")])] if swept else []),
    ])
    payload = {"benchmark": "optimizer_step", "machine": info, "device": str(device), "preset": preset,
               "dtype": args.dtype, "parameters": n, "tensors": len(shapes), "iters": iters,
               "copy_bandwidth_gbps": copy_gbps, "rows": rows, "ratios": speedups, "check": checks,
               "int64_check": big, "sweep": swept}
    json_path, md_path = _common.write_results(args.out, f"optimizer_step_{device.type}", payload, md)
    print(f"wrote {json_path} and {md_path}")
    return payload


if __name__ == "__main__":
    main()
