"""Wrong arguments and wrong use of the fused optimizers raise ConfigError naming the value and the fix."""

from __future__ import annotations

import pytest
import torch

from bitpipe_fx.errors import ConfigError
from bitpipe_fx.optim import REX, AdamW, LRProfile, ScheduleFreeAdamW, ScheduleFreeSGD


def params():
    return [torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ScheduleFreeAdamW(params(), lr=-1e-3), r"lr=-0\.001 must be a finite number >= 0"),
        (lambda: ScheduleFreeAdamW(params(), lr=float("nan")), r"lr=nan must be a finite number"),
        (lambda: ScheduleFreeAdamW(params(), betas=(1.0, 0.999)), r"betas\[0\]=1\.0 must be in \(0, 1\)"),
        (lambda: ScheduleFreeAdamW(params(), betas=(0.0, 0.999)), r"betas\[0\]=0\.0 must be in \(0, 1\)"),
        (lambda: ScheduleFreeAdamW(params(), betas=(0.9, 1.0)), r"betas\[1\]=1\.0 must be in \[0, 1\)"),
        (lambda: ScheduleFreeAdamW(params(), betas=(0.9, -0.1)), r"betas\[1\]=-0\.1 must be in \[0, 1\)"),
        (lambda: ScheduleFreeAdamW(params(), weight_decay=-1), r"weight_decay=-1 must be a finite number >= 0"),
        (lambda: ScheduleFreeAdamW(params(), warmup_steps=2.5), r"warmup_steps=2\.5 must be an int >= 0"),
        (lambda: ScheduleFreeAdamW(params(), weight_lr_power=-2), r"weight_lr_power=-2 must be"),
        (lambda: ScheduleFreeAdamW(params(), backend="cuda"), r"backend='cuda' is not one of"),
        (lambda: ScheduleFreeSGD(params(), lr=-1.0), r"lr=-1\.0 must be a finite number >= 0"),
        (lambda: ScheduleFreeSGD(params(), momentum=1.0), r"momentum=1\.0 must be in \(0, 1\)"),
        (lambda: ScheduleFreeSGD(params(), momentum=0.0), r"momentum=0\.0 must be in \(0, 1\)"),
        (lambda: AdamW(params(), lr=-1e-3), r"lr=-0\.001 must be"),
        (lambda: AdamW(params(), betas=(0.9, 1.5)), r"betas\[1\]=1\.5 must be in \[0, 1\)"),
        (lambda: AdamW(params(), betas=(-0.1, 0.9)), r"betas\[0\]=-0\.1 must be in \[0, 1\)"),
        (lambda: AdamW(params(), eps=-1e-8), r"eps=-1e-08 must be a finite number >= 0"),
        (lambda: AdamW(params(), lr_profile="step"), r"lr profile 'step' is unknown; use one of"),
        (lambda: AdamW(params(), lr_profile="rex"), r"lr profile 'rex' needs total_steps .* got total_steps=None"),
        (lambda: AdamW(params(), lr_profile="cosine", total_steps=5, warmup_steps=5), r"greater than warmup_steps=5"),
        (lambda: AdamW(params(), lr=1e-3, lr_profile="rex", total_steps=9, min_lr=1e-2), r"lr=0\.001 is below min_lr"),
        (lambda: AdamW(params(), lr_profile=3), r"lr_profile=3 must be an LRProfile"),
        (lambda: LRProfile("rex", total_steps=9, d=1.0), r"REX d=1\.0 must be in \[0, 1\)"),
        (lambda: REX(torch.optim.SGD(params(), lr=0.1), total_steps=0), r"needs total_steps .* got total_steps=0"),
        (lambda: REX(torch.optim.SGD(params(), lr=0.1), total_steps=9, min_lr=1.0), r"lr=0\.1 is below min_lr=1\.0"),
        (lambda: ScheduleFreeSGD([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))]), r"dtype torch\.complex"),
    ],
)
def test_wrong_arguments_raise_config_error(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


@pytest.mark.parametrize("cls", [ScheduleFreeAdamW, ScheduleFreeSGD])
def test_step_in_eval_mode_is_refused(cls):
    p = params()
    opt = cls(p, backend="torch")  # the package's convention: optimizers start in eval mode
    p[0].grad = torch.ones(3)
    with pytest.raises(ConfigError, match=r"step\(\) called while param group 0 is in eval mode.*optimizer\.train\(\)"):
        opt.step()
    opt.train()
    opt.step()
    opt.eval()
    with pytest.raises(ConfigError, match="eval mode"):
        opt.step()
    assert opt.kernel(0).read()["k"] == 1


def test_bad_param_group_is_not_added():
    opt = ScheduleFreeAdamW(params(), backend="torch")
    with pytest.raises(ConfigError, match=r"lr=-5\.0"):
        opt.add_param_group({"params": params(), "lr": -5.0})
    assert len(opt.param_groups) == 1


def test_sparse_gradient_is_refused_by_name():
    p = torch.nn.Parameter(torch.ones(4))
    opt = AdamW([p], backend="torch")
    p.grad = torch.ones(4).to_sparse()
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.params\[0\]: sparse gradients are not supported"):
        opt.step()
