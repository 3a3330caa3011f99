"""bitpipe_fx.optim: fused Schedule-Free AdamW/SGD, AdamW with a device-side lr profile, and the REX scheduler.

All three optimizers are torch.optim.Optimizer subclasses, each a thin front (its own module) over
its kernel module in bitpipe_fx.kernels; ``OPTIMIZERS`` (registry.py) names them. On CUDA each
step is one scalar launch plus one element-wise launch per parameter group (per dtype/alignment
bucket), with every step-dependent scalar computed on the device. On other devices the torch
path runs the same math with multi-tensor ops. See bitpipe_fx.kernels for the design and for
how to add an optimizer.

    opt = bp.optim.ScheduleFreeAdamW(model.parameters(), lr=3e-4, warmup_steps=100)
    opt.train()   # before training steps;  opt.eval() before evaluating or saving

The names load on first use, so that ``bitpipe_fx.optim.registry`` can be read without torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "AdamW": "bitpipe_fx.optim.adamw",
    "LRProfile": "bitpipe_fx.optim.lr",
    "OPTIMIZERS": "bitpipe_fx.optim.registry",
    "PROFILES": "bitpipe_fx.optim.lr",
    "REX": "bitpipe_fx.optim.lr",
    "ScheduleFreeAdamW": "bitpipe_fx.optim.sf_adamw",
    "ScheduleFreeSGD": "bitpipe_fx.optim.sf_sgd",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bitpipe_fx.optim' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = sorted(_LAZY)
