"""bitpipe_fx.optim: fused Schedule-Free AdamW/SGD, AdamW with a device-side lr profile, and the REX scheduler.

All three optimizers are torch.optim.Optimizer subclasses; on CUDA each step is one scalar
launch plus one element-wise launch per parameter group (per dtype/alignment bucket), with
every step-dependent scalar computed on the device. On other devices the torch path runs the
same math with multi-tensor ops. See bitpipe_fx.kernels for the design.

    opt = bp.optim.ScheduleFreeAdamW(model.parameters(), lr=3e-4, warmup_steps=100)
    opt.train()   # before training steps;  opt.eval() before evaluating or saving
"""

from __future__ import annotations

from bitpipe_fx.optim.adamw import AdamW
from bitpipe_fx.optim.lr import PROFILES, REX, LRProfile
from bitpipe_fx.optim.schedulefree import ScheduleFreeAdamW, ScheduleFreeSGD

__all__ = ["PROFILES", "REX", "AdamW", "LRProfile", "ScheduleFreeAdamW", "ScheduleFreeSGD"]
