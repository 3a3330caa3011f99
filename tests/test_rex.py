"""REX and the other lr profiles: known values, the REX scheduler, and AdamW(lr_profile=) vs torch AdamW + LambdaLR."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bitpipe_fx.optim import REX, AdamW, LRProfile, ScheduleFreeSGD


def test_rex_values_at_known_points():
    rex = LRProfile("rex", total_steps=100)
    assert rex.lr(0, 1.0) == 1.0  # z = 0
    assert rex.lr(50, 1.0) == pytest.approx(0.5 / 0.75)  # z = 0.5: 2/3
    assert rex.lr(90, 1.0) == pytest.approx(0.1 / 0.55)  # z = 0.9: 2/11
    assert rex.lr(100, 1.0) == 0.0  # z = 1
    assert rex.lr(150, 1.0) == 0.0  # past the end: stays at the floor
    floor = LRProfile("rex", total_steps=100, min_lr=0.1)
    assert floor.lr(50, 1.0) == pytest.approx(0.1 + 0.9 * 2 / 3)
    assert floor.lr(100, 1.0) == pytest.approx(0.1)
    assert LRProfile("rex", total_steps=100, d=0.0).lr(50, 1.0) == pytest.approx(0.5)  # d = 0 is linear


def test_warmup_then_rex_and_first_step_not_at_zero():
    rex = LRProfile("rex", total_steps=110, warmup_steps=10)
    assert rex.lr(0, 2.0) == pytest.approx(0.2)  # (k+1)/W of the peak: never 0
    assert rex.lr(4, 2.0) == pytest.approx(1.0)
    assert rex.lr(9, 2.0) == pytest.approx(2.0)
    assert rex.lr(10, 2.0) == pytest.approx(2.0)  # z = 0 after warm-up
    assert rex.lr(60, 2.0) == pytest.approx(2.0 * 2 / 3)  # z = 0.5
    assert rex.lr(100, 2.0) == pytest.approx(2.0 * 2 / 11)  # z = 0.9


def expected_factor(kind: str, k: int, warmup: int, total: int, floor_ratio: float) -> float:
    """The profiles written out independently of bitpipe_fx: lr(k) / base lr."""
    if k < warmup:
        return (k + 1) / warmup
    if kind == "constant":
        return 1.0
    z = min((k - warmup) / (total - warmup), 1.0)
    shape = {"linear": 1 - z, "cosine": (1 + math.cos(math.pi * z)) / 2, "rex": (1 - z) / (1 - z / 2)}[kind]
    return floor_ratio + (1 - floor_ratio) * shape


def test_rex_scheduler_drives_any_optimizer():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p, ], lr=0.5)
    sched = REX(opt, total_steps=40, warmup_steps=4, min_lr=0.05)
    seen = []
    for _ in range(50):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert seen[0] > 0
    for k, lr in enumerate(seen):
        assert lr == pytest.approx(0.5 * expected_factor("rex", k, 4, 40, 0.1)), k


def test_rex_scheduler_with_schedule_free_matches_package():
    """Host-side lr changes reach the device scalars: SF-SGD + REX equals schedulefree's SGD + REX."""
    schedulefree = pytest.importorskip("schedulefree")
    results = []
    for cls in (ScheduleFreeSGD, schedulefree.SGDScheduleFree):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 7, dtype=torch.float64))
        opt = cls([p], lr=0.1, warmup_steps=3)
        sched = REX(opt, total_steps=30, warmup_steps=5)
        opt.train()
        gen = torch.Generator().manual_seed(0)
        for _ in range(30):
            p.grad = torch.randn(7, generator=gen, dtype=torch.float64)
            opt.step()
            sched.step()
        opt.eval()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


PROFILE_CASES = {
    "constant": dict(warmup_steps=5),
    "linear": dict(total_steps=120, warmup_steps=10, min_lr=1e-4),
    "cosine": dict(total_steps=100, warmup_steps=10, min_lr=1e-4),  # ends before the run: the floor holds
    "rex": dict(total_steps=120, warmup_steps=10, min_lr=1e-4),
}
SHAPES = [(1,), (7, 5), (300,)]
BASE_LR, SECOND_LR = 1e-2, 4e-3


def train_adamw(make_opt, dtype, steps, gen_seed=0, params=None, opt=None, start=0):
    gen = torch.Generator().manual_seed(gen_seed)
    if params is None:
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]
        opt = make_opt([{"params": params[:2]}, {"params": params[2:], "lr": SECOND_LR, "weight_decay": 0.0}])
    opt, sched = opt if isinstance(opt, tuple) else (opt, None)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
        opt.step()
        if sched:
            sched.step()
    return params, opt


def torch_reference(kind, kw):
    total, warmup, floor = kw.get("total_steps", 0), kw.get("warmup_steps", 0), kw.get("min_lr", 0.0)

    def make(groups):
        opt = torch.optim.AdamW(groups, lr=BASE_LR, weight_decay=0.05)
        lambdas = [lambda k, base=g["lr"]: expected_factor(kind, k, warmup, total, floor / base)
                   for g in opt.param_groups]
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)

    return make


@pytest.mark.parametrize("kind", PROFILE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamw_profile_matches_torch_adamw_with_lambdalr(kind, dtype):
    kw = PROFILE_CASES[kind]
    ours, _ = train_adamw(lambda g: AdamW(g, lr=BASE_LR, weight_decay=0.05, lr_profile=kind, backend="torch", **kw),
                          dtype, 120)
    want, _ = train_adamw(torch_reference(kind, kw), dtype, 120)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, **tol)


def test_adamw_accepts_an_lrprofile_and_reports_scheduled_lr():
    profile = LRProfile("cosine", total_steps=20, warmup_steps=2, min_lr=1e-3)
    _, opt = train_adamw(lambda g: AdamW(g, lr=BASE_LR, lr_profile=profile, backend="torch"), torch.float32, 7)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["step"] == 7
    assert sd["param_groups"][0]["scheduled_lr"] == pytest.approx(profile.lr(6, BASE_LR))
    assert sd["param_groups"][1]["scheduled_lr"] == pytest.approx(profile.lr(6, SECOND_LR))


def test_adamw_state_dict_round_trip_continues_identically():
    make = lambda g: AdamW(g, lr=BASE_LR, lr_profile="rex", total_steps=50, warmup_steps=5, backend="torch")
    params, opt = train_adamw(make, torch.float32, 20)
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == {"exp_avg", "exp_avg_sq"}
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = AdamW([{"params": clone[:2]}, {"params": clone[2:]}], backend="torch")
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr_profile"] == "rex"
    train_adamw(make, torch.float32, 15, gen_seed=5, params=params, opt=opt)
    train_adamw(make, torch.float32, 15, gen_seed=5, params=clone, opt=resumed)
    for a, b in zip(params, clone):
        assert torch.equal(a, b)
