"""The optimizer registry (what --optimizer accepts) and the kernel modules behind it; triton stays optional."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.kernels import engine
from bitpipe_fx.optim import OPTIMIZERS, REX, AdamW, ScheduleFreeAdamW, ScheduleFreeSGD
from bitpipe_fx.optim.base import FusedOptimizer
from bitpipe_fx.train.job import TrainConfig, optimizer_factory

RUN = dict(lr=2e-2, warmup_steps=2, weight_decay=0.05, total_steps=6)


def test_every_name_builds_its_front_over_a_complete_kernel_module():
    assert list(OPTIMIZERS) == ["sf-adamw", "sf-sgd", "adamw-rex"]
    assert [entry.front() for entry in OPTIMIZERS.values()] == [ScheduleFreeAdamW, ScheduleFreeSGD, AdamW]
    for entry in OPTIMIZERS.values():
        front = entry.front()
        assert issubclass(front, FusedOptimizer)
        for name in ("advance", "torch_update", "scalar_kernel", "step_kernel"):
            assert callable(getattr(front.update, name)), f"{front.update.__name__} lacks {name}"


def _steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int,
           scheduler: REX | None = None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().clone() for p in params]


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in ((7,), (3, 5))]


def test_adamw_rex_is_torch_adamw_under_the_rex_scheduler_over_the_run():
    """The registry's adamw-rex for a 6-step run follows torch.optim.AdamW driven by REX(total_steps=6)."""
    ours = _params()
    opt = OPTIMIZERS["adamw-rex"].build(ours, **RUN)
    ref = _params()
    torch_opt = torch.optim.AdamW(ref, lr=RUN["lr"], weight_decay=RUN["weight_decay"])
    rex = REX(torch_opt, total_steps=RUN["total_steps"], warmup_steps=RUN["warmup_steps"])
    for a, b in zip(_steps(opt, ours, 8), _steps(torch_opt, ref, 8, rex)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["sf-adamw", "sf-sgd"])
def test_schedule_free_names_ignore_the_run_length(name):
    """Schedule-Free needs no horizon: the built optimizer is the front with the run's lr, warm-up and decay."""
    ours, direct = _params(), _params()
    opt = OPTIMIZERS[name].build(ours, **RUN)
    ref = OPTIMIZERS[name].front()(direct, lr=RUN["lr"], warmup_steps=RUN["warmup_steps"],
                                   weight_decay=RUN["weight_decay"])
    for o in (opt, ref):
        o.train()
    for a, b in zip(_steps(opt, ours, 4), _steps(ref, direct, 4)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_training_job_builds_its_optimizer_from_the_registry():
    cfg = TrainConfig(optimizer="adamw-rex", lr=1e-2, warmup=3, weight_decay=0.1, steps=12)
    opt = optimizer_factory(cfg)(_params())
    group = opt.param_groups[0]
    assert type(opt) is AdamW
    assert (group["lr_profile"], group["total_steps"], group["warmup_steps"], group["weight_decay"]) == (
        "rex", 12, 3, 0.1)


def test_set_inputs_refuses_a_slot_that_is_not_a_hyper_parameter():
    kernel = engine.GroupKernel(ScheduleFreeSGD.update, engine.S.Profile.CONSTANT, torch.device("cpu"), "torch")
    with pytest.raises(ConfigError, match=r"slots \[16\] are not hyper-parameter slots"):
        kernel.set_inputs({engine.S.GAMMA: 1.0}, 0.1)


def test_reading_the_registry_imports_no_torch():
    code = "import sys, bitpipe_fx.train.command; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


BLOCK_TRITON = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "triton":
            raise ImportError("triton is blocked for this test")
sys.meta_path.insert(0, Block())
"""
STEPS = """
import torch
from bitpipe_fx.optim import OPTIMIZERS
gen = torch.Generator().manual_seed(0)
out = []
for name, entry in OPTIMIZERS.items():
    p = torch.nn.Parameter(torch.randn(9, generator=gen, dtype=torch.float64))
    opt = entry.build([p], lr=1e-2, warmup_steps=1, weight_decay=0.1, total_steps=4)
    getattr(opt, "train", lambda: None)()
    for _ in range(3):
        p.grad = torch.randn(9, generator=gen, dtype=torch.float64)
        opt.step()
    getattr(opt, "eval", lambda: None)()
    out.append(p.detach().tolist())
"""


def test_without_triton_the_torch_path_runs_and_gives_the_same_numbers():
    """triton is an optional extra: with it blocked, every optimizer steps on the torch path, unchanged."""
    code = BLOCK_TRITON + STEPS + "assert 'triton' not in sys.modules\nprint(repr(out))"
    blocked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert blocked.returncode == 0, blocked.stderr[-2000:]
    here: dict[str, object] = {}
    exec(STEPS, here)
    assert blocked.stdout.strip() == repr(here["out"])
