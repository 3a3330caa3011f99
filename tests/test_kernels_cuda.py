"""The compiled Triton kernels on a real GPU (skipped without CUDA).

The test session runs Triton in interpreter mode (tests/conftest.py), which cannot address device
memory, so the checks run in a subprocess with the interpreter off. Under the interpreter the
optimizers fall back to the torch path for CUDA tensors; that is checked here too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.optim import ScheduleFreeAdamW


def _cuda_checks() -> None:
    """Run with TRITON_INTERPRET unset: no host sync in a step, CUDA-graph replay, Triton == torch path."""
    import schedulefree

    from bitpipe_fx.optim import AdamW, ScheduleFreeSGD

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    shapes = [(1,), (4099,), (257, 33), (4096 * 3,)]
    init = [torch.randn(s, device=dev, generator=gen) for s in shapes]
    grads = [torch.randn(s, device=dev, generator=gen) for s in shapes]

    # 1. Two eager steps (the second under sync-debug "error"), then a captured step replayed 4 times.
    eager, graphed = ([torch.nn.Parameter(t.clone()) for t in init] for _ in range(2))
    opts = [ScheduleFreeAdamW(ps, lr=1e-2, warmup_steps=3) for ps in (eager, graphed)]
    assert opts[0].kernel(0).backend == "triton"
    for o, ps in zip(opts, (eager, graphed)):
        o.train()
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opts[0].step()
        opts[1].step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        opts[1].step()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(4):
        graph.replay()
        opts[0].step()
    torch.cuda.synchronize()
    assert opts[0].kernel(0).read()["k"] == opts[1].kernel(0).read()["k"] == 6
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # 2. Triton vs the torch path vs the package, on the GPU, 30 steps with weight decay, r and power.
    for ours, ref in ((lambda ps, b: ScheduleFreeAdamW(ps, lr=2e-2, weight_decay=0.03, warmup_steps=5, r=0.5,
                                                        weight_lr_power=1.5, backend=b),
                       lambda ps: schedulefree.AdamWScheduleFree(ps, lr=2e-2, weight_decay=0.03, warmup_steps=5,
                                                                 r=0.5, weight_lr_power=1.5)),
                      (lambda ps, b: ScheduleFreeSGD(ps, lr=5e-2, weight_decay=0.01, warmup_steps=5, backend=b),
                       lambda ps: schedulefree.SGDScheduleFree(ps, lr=5e-2, weight_decay=0.01, warmup_steps=5))):
        runs = []
        for make in (lambda ps, ours=ours: ours(ps, "triton"), lambda ps, ours=ours: ours(ps, "torch"), ref):
            ps = [torch.nn.Parameter(t.clone()) for t in init]
            o = make(ps)
            o.train()
            g = torch.Generator(device=dev).manual_seed(1)
            for _ in range(30):
                for p in ps:
                    p.grad = torch.randn(p.shape, device=dev, generator=g)
                o.step()
            o.eval()
            runs.append([p.detach().clone() for p in ps])
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # 3. bf16 parameters and the AdamW profile kernel run and stay finite.
    ps = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in init]
    o = AdamW(ps, lr=1e-3, lr_profile="cosine", total_steps=10, warmup_steps=2)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, device=dev, generator=gen).to(torch.bfloat16)
        o.step()
    assert all(torch.isfinite(p).all() for p in ps) and o.state[ps[0]]["exp_avg"].dtype == torch.float32


@pytest.mark.gpu
def test_compiled_kernels_on_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_kernels_cuda as t; t._cuda_checks()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter fallback")
def test_cuda_under_interpreter_uses_torch_path():
    p = torch.nn.Parameter(torch.ones(5, device="cuda"))
    opt = ScheduleFreeAdamW([p])
    assert opt.kernel(0).backend == "torch"
    with pytest.raises(ConfigError, match="cannot run under the Triton interpreter"):
        ScheduleFreeAdamW([p], backend="triton").kernel(0)
