"""The Triton kernels themselves (under TRITON_INTERPRET=1 on CPU tensors) against the CPU path."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("triton")

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.kernels import DEFAULT_BLOCK, GroupKernel, Profile, adamw, sf_adamw, sf_sgd, tables
from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.optim import AdamW, ScheduleFreeAdamW, ScheduleFreeSGD

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the Triton interpreter")

SHAPES = [(1,), (5, 3), (DEFAULT_BLOCK - 1,), (DEFAULT_BLOCK + 3,), (4,)]
NEVER = 4  # this parameter never gets a gradient
STEPS = 8
FACTORIES = {
    "sf_adamw": lambda groups, backend: ScheduleFreeAdamW(
        groups, lr=2e-2, betas=(0.85, 0.98), weight_decay=0.03, warmup_steps=3, r=0.7, weight_lr_power=1.5,
        backend=backend),
    "sf_sgd": lambda groups, backend: ScheduleFreeSGD(
        groups, lr=5e-2, momentum=0.85, weight_decay=0.01, warmup_steps=3, r=0.7, weight_lr_power=1.5, backend=backend),
    "adamw_rex": lambda groups, backend: AdamW(
        groups, lr=1e-2, weight_decay=0.05, lr_profile="rex", total_steps=10, warmup_steps=2, min_lr=1e-3,
        backend=backend),
}



def run(name, backend, dtype, steps=STEPS, in_place_grads=False, make=None):
    """Parameters (x and y for Schedule-Free) and state after `steps` steps with seeded gradients."""
    gen = torch.Generator().manual_seed(0)
    params = make(dtype) if make else [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = FACTORIES[name]([{"params": params[:2]}, {"params": params[2:], "lr": 4e-3}], backend)
    schedule_free = hasattr(opt, "train")
    if schedule_free:
        opt.train()
    for i in range(steps):
        for j, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            if j == NEVER:
                continue
            if in_place_grads and p.grad is not None:
                p.grad.copy_(g)
            else:
                p.grad = g
        opt.step()
        if schedule_free and i == steps // 2:
            opt.eval()
            opt.train()
    out = {}
    if schedule_free:
        opt.eval()
        out["x"] = [p.detach().clone() for p in params]
        opt.train()
    out["y"] = [p.detach().clone() for p in params]
    for key in opt.state_keys:
        out[key] = [opt.state[p][key].clone() for p in params if opt.state[p]]
    return out, opt


def assert_same(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for key in a:
        assert len(a[key]) == len(b[key])
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, key=key, i=i: f"{key}[{i}]: {m}")


@pytest.mark.parametrize("name", FACTORIES)
def test_triton_matches_cpu_path_float32(name):
    got, opt = run(name, "triton", torch.float32)
    want, _ = run(name, "torch", torch.float32)
    assert opt.kernel(0).backend == "triton"
    assert_same(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sf_adamw", "adamw_rex"])
def test_triton_matches_cpu_path_float64(name):
    got, _ = run(name, "triton", torch.float64, steps=4)
    want, _ = run(name, "torch", torch.float64, steps=4)
    assert_same(got, want, rtol=1e-12, atol=1e-12)


def test_triton_bf16_parameters():
    """bf16 y is rounded once from float32 math: after a step (and a round trip through x) the paths agree to
    one bf16 rounding, and the float32 state to float32 rounding."""
    got, _ = run("sf_adamw", "triton", torch.bfloat16, steps=1)
    want, _ = run("sf_adamw", "torch", torch.bfloat16, steps=1)
    assert all(z.dtype == torch.float32 for z in got["z"])
    for key in ("x", "y"):
        for a, b in zip(got[key], want[key]):
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-6)
    assert_same({k: got[k] for k in ("z", "exp_avg_sq")}, {k: want[k] for k in ("z", "exp_avg_sq")}, 1e-5, 1e-6)


def test_unaligned_views_take_the_unaligned_bucket():
    """Parameters that are views at odd element offsets cannot use 16-byte accesses; the result is unchanged."""
    def make(dtype):
        gen = torch.Generator().manual_seed(0)
        flat = torch.randn(1 + sum(torch.Size(s).numel() for s in SHAPES), generator=gen, dtype=dtype)
        out, at = [], 1
        for s in SHAPES:
            n = torch.Size(s).numel()
            out.append(torch.nn.Parameter(flat[at : at + n].view(s)))
            at += n
        return out

    got, opt = run("sf_sgd", "triton", torch.float32, steps=3, make=make)
    want, _ = run("sf_sgd", "torch", torch.float32, steps=3, make=make)
    assert_same(got, want, rtol=1e-5, atol=1e-6)
    assert any(key[-1] is False for key in opt.kernel(1)._tables), "no unaligned bucket was built"


def test_tables_are_reused_while_addresses_stay(monkeypatch):
    builds = []
    real = tables.build_table
    monkeypatch.setattr(tables, "build_table", lambda *a: builds.append(1) or real(*a))
    got, _ = run("sf_adamw", "triton", torch.float32, steps=4, in_place_grads=True)
    assert len(builds) == 2 + 2  # per group: one step table, one lerp table (eval and train share it)
    want, _ = run("sf_adamw", "torch", torch.float32, steps=4, in_place_grads=True)
    assert_same(got, want, rtol=1e-5, atol=1e-6)


CASES = [(sf_adamw, Profile.CONSTANT), (sf_sgd, Profile.CONSTANT)] + [(adamw, p) for p in Profile]
INPUTS = dict(zip(range(S.BETA1, S.N_INPUTS), [0.85, 0.98, 1e-8, 0.1, 4, 0.7, 1.5, 1 - 1 / 0.85, 0.15, 20, 1e-4, 0.5]))


@pytest.mark.parametrize(("update", "profile"), CASES, ids=lambda c: getattr(c, "__name__", str(c)))
@pytest.mark.parametrize("lr", [3e-3, 0.0])
def test_scalar_kernel_matches_host_math(update, profile, lr):
    """Step count, lr_max, Σweight, γ, c and bias terms on the device equal the host's float64 math."""
    kernels = [GroupKernel(update, profile, torch.device("cpu"), b) for b in ("triton", "torch")]
    for k in kernels:
        k.set_inputs(INPUTS, lr)
    for step in range(25):
        for k in kernels:
            k.step([])
        dev, host = kernels[0].slots.tolist(), kernels[1].slots.tolist()
        for slot in range(S.N_SLOTS):
            assert dev[slot] == pytest.approx(host[slot], rel=1e-13, abs=1e-300), f"step {step} slot {slot}"


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    p = torch.nn.Parameter(torch.ones(3))
    opt = ScheduleFreeSGD([p], backend="triton")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        opt.train()


def test_non_dense_parameter_is_refused_by_name():
    base = torch.randn(4, 6)
    p = torch.nn.Parameter(base[:, ::2])
    p.grad = torch.randn(4, 3)
    opt = AdamW([p], backend="triton")
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.params\[0\].*dense"):
        opt.step()


def test_checkpoint_from_triton_resumes_on_cpu_path():
    """The slots are backend-independent: a Triton run's state dict continues on the torch path and vice versa."""
    got, opt = run("sf_adamw", "triton", torch.float32, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["k"] == 3
    params = [torch.nn.Parameter(y.clone()) for y in got["y"]]
    resumed = ScheduleFreeAdamW([{"params": params[:2]}, {"params": params[2:]}], backend="torch")
    resumed.load_state_dict(saved)
    assert resumed.kernel(1).read()["k"] == 3
    assert resumed.kernel(1).read()["weight_sum"] == opt.kernel(1).read()["weight_sum"]
