"""Schedule-Free AdamW/SGD (CPU path) against the schedulefree package and its Reference classes."""

from __future__ import annotations

import copy

import pytest
import torch

schedulefree = pytest.importorskip("schedulefree")

from bitpipe_fx.kernels import DEFAULT_BLOCK  # noqa: E402
from bitpipe_fx.optim import ScheduleFreeAdamW, ScheduleFreeSGD  # noqa: E402

# 1 element, a 2-d tensor, just below and just above one kernel block, and a small odd one.
SHAPES = [(1,), (5, 3), (DEFAULT_BLOCK - 1,), (DEFAULT_BLOCK + 3,), (2, 17), (4,)]
INTERMITTENT, NEVER = 1, 5  # parameter 1 has no gradient every third step; parameter 5 never has one
STEPS = 120
ADAMW_KW = dict(lr=2e-2, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.03, warmup_steps=15, r=0.7, weight_lr_power=1.5)
SGD_KW = dict(lr=5e-2, momentum=0.85, weight_decay=0.01, warmup_steps=15, r=0.7, weight_lr_power=1.5)
CASES = {
    "adamw": (ScheduleFreeAdamW, ADAMW_KW, schedulefree.AdamWScheduleFree, schedulefree.AdamWScheduleFreeReference),
    "sgd": (ScheduleFreeSGD, SGD_KW, schedulefree.SGDScheduleFree, schedulefree.SGDScheduleFreeReference),
}



def make_params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def groups(params, second_lr):
    """Two param groups; the second overrides lr and weight decay."""
    return [{"params": params[:3]}, {"params": params[3:], "lr": second_lr, "weight_decay": 0.0}]


def set_grads(params, gen, step):
    for j, p in enumerate(params):
        skip = j == NEVER or (j == INTERMITTENT and step % 3 == 0)
        p.grad = None if skip else torch.randn(p.shape, generator=gen, dtype=p.dtype)


def train(opt, params, steps, gen, start=0):
    """`steps` steps with fresh randn gradients; one eval/train round trip in the middle, as in real training."""
    for i in range(start, start + steps):
        set_grads(params, gen, i)
        opt.step()
        if i == start + steps // 2:
            opt.eval()
            opt.train()


def snapshot(opt, params):
    """x (after eval), y (after train) and z of every parameter that has state."""
    opt.eval()
    x = [p.detach().clone() for p in params]
    opt.train()
    y = [p.detach().clone() for p in params]
    z = [opt.state[p]["z"].clone() for p in params if "z" in opt.state[p]]
    return x, y, z


def run(cls, kw, dtype, steps=STEPS, **extra):
    params = make_params(dtype)
    opt = cls(groups(params, kw["lr"] / 4), **kw, **extra)
    opt.train()
    train(opt, params, steps, torch.Generator().manual_seed(1))
    return opt, params, snapshot(opt, params)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("which", ["package", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_schedulefree(case, which, dtype, capsys):
    ours, kw, package, reference = CASES[case]
    _, _, got = run(ours, kw, dtype, backend="torch")
    _, _, want = run(package if which == "package" else reference, kw, dtype)
    capsys.readouterr()  # the Reference classes print on train()/eval()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for name, a, b, count in zip(("x after eval", "y after train", "z"), got, want, (6, 6, 5)):
        assert len(a) == len(b) == count, name
        for i, (ta, tb) in enumerate(zip(a, b)):
            torch.testing.assert_close(ta, tb, **tol, msg=lambda m, name=name, i=i: f"{name}[{i}]: {m}")


@pytest.mark.parametrize("case", CASES)
def test_no_grad_parameter_untouched_and_stateless(case):
    ours, kw, _, _ = CASES[case]
    opt, params, (x, y, _) = run(ours, kw, torch.float32, steps=5, backend="torch")
    assert not opt.state[params[NEVER]]
    assert torch.equal(x[NEVER], make_params(torch.float32)[NEVER].detach())
    assert torch.equal(y[NEVER], x[NEVER])


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip_continues_identically(case):
    ours, kw, package, _ = CASES[case]
    gen = torch.Generator().manual_seed(1)
    params = make_params(torch.float32)
    opt = ours(groups(params, kw["lr"] / 4), **kw, backend="torch")
    opt.train()
    train(opt, params, 40, gen)
    opt.eval()  # the package's advice: checkpoint in eval mode
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]

    # The checkpoint carries the package's group counters with the package's values.
    pkg_params = make_params(torch.float32)
    pkg = package(groups(pkg_params, kw["lr"] / 4), **kw)
    pkg.train()
    train(pkg, pkg_params, 40, torch.Generator().manual_seed(1))
    for mine, theirs in zip(saved["param_groups"], pkg.param_groups):
        assert mine["k"] == theirs["k"] == 40
        assert mine["lr_max"] == pytest.approx(theirs["lr_max"], rel=1e-15)
        assert mine["weight_sum"] == pytest.approx(theirs["weight_sum"], rel=1e-14)
        assert mine["train_mode"] is False
    assert set(saved["state"][0]) == set(ours.state_keys)

    clone = [torch.nn.Parameter(t.clone()) for t in saved_params]
    resumed = ours(groups(clone, 1.0), lr=1.0, backend="torch")  # hyper-parameters come from the checkpoint
    resumed.load_state_dict(saved)
    for o in (opt, resumed):
        o.train()
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    train(opt, params, 25, gen_a, start=40)
    train(resumed, clone, 25, gen_b, start=40)
    for a, b in zip(snapshot(opt, params), snapshot(resumed, clone)):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)


def test_bf16_parameters_keep_float32_state():
    """bf16 parameters: z and v stay float32 (also through a checkpoint), y is the float32 update rounded once."""
    params16 = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in make_params(torch.float32)]
    params32 = [torch.nn.Parameter(p.detach().float()) for p in params16]
    opts = [ScheduleFreeAdamW(ps, lr=1e-2, weight_decay=0.1, backend="torch") for ps in (params16, params32)]
    gen = torch.Generator().manual_seed(3)
    for o in opts:
        o.train()
    for p16, p32 in zip(params16, params32):
        p16.grad = torch.randn(p16.shape, generator=gen).to(torch.bfloat16)
        p32.grad = p16.grad.float()
    for o in opts:
        o.step()
    for p16, p32 in zip(params16, params32):
        s16, s32 = opts[0].state[p16], opts[1].state[p32]
        assert s16["z"].dtype == s16["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(s16["z"], s32["z"]) and torch.equal(s16["exp_avg_sq"], s32["exp_avg_sq"])
        assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16))  # round-to-nearest-even, once
    resumed = ScheduleFreeAdamW(params16, backend="torch")
    resumed.load_state_dict(copy.deepcopy(opts[0].state_dict()))
    p = params16[3]
    assert resumed.state[p]["z"].dtype == torch.float32
    assert torch.equal(resumed.state[p]["z"], opts[0].state[p]["z"])


def test_new_group_joins_in_current_mode():
    params = make_params(torch.float32)
    opt = ScheduleFreeSGD(params[:2], backend="torch")
    opt.train()
    opt.add_param_group({"params": params[2:]})
    assert [g["train_mode"] for g in opt.param_groups] == [True, True]


def test_tensor_lr_equals_float_lr():
    """lr may be a tensor (as in the package); it is copied on the device each step, never read back."""
    results = []
    for lr in (5e-2, torch.tensor(5e-2, dtype=torch.float64)):
        params = make_params(torch.float64)
        opt = ScheduleFreeSGD(params, lr=lr, warmup_steps=3, backend="torch")
        opt.train()
        train(opt, params, 10, torch.Generator().manual_seed(1))
        results.append(snapshot(opt, params))
    for a, b in zip(*results):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)
