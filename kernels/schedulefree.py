"""What Schedule-Free AdamW and SGD share: the step's scalars and the y/z update, on the host and in Triton.

With t = k + 1 (k steps taken so far), as the ``schedulefree`` package computes them::

    lr_t   = lr · min(1, t / warmup)                 linear warm-up
    lr_max = max(lr_max, lr_t)
    weight = t^r · lr_max^weight_lr_power
    c      = weight / Σweight                        (0 while Σweight = 0)
    bias2  = 1 - β2^t                                (AdamW's second-moment correction)
    coef   = lr_t · (β1·(1 - c) - 1)

and, given the optimizer's direction u (:mod:`.sf_adamw`, :mod:`.sf_sgd`), the iterates move as
the package's foreach path writes them (y is where gradients are taken, z the base sequence)::

    y <- y + c·(z - y) + coef·u
    z <- z - lr_t·u

The host math follows the package operation for operation (Python floats are IEEE doubles), so
the CPU path reproduces its scalars bit for bit; the scalar kernel computes the same in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.kernels.lang import (
    BETA1,
    BETA2,
    BIAS2,
    COEF,
    GAMMA,
    LR_MAX,
    WLR_POWER,
    WSUM,
    C,
    K,
    R,
    jit,
    pow_f64,
    tl,
    to_param,
    warmup_ramp,
)

Tensors = list[torch.Tensor]


def advance(profile: S.Profile, slots: Sequence[float]) -> list[float]:
    """The slot values after one step (host twin of scalar_kernel); Schedule-Free has no lr profile."""
    s = list(slots)
    k, beta1, beta2 = s[S.K], s[S.BETA1], s[S.BETA2]
    sched = (k + 1) / s[S.WARMUP] if k < s[S.WARMUP] else 1.0
    lr_t = s[S.LR] * sched
    lr_max = max(lr_t, s[S.LR_MAX])
    weight = ((k + 1) ** s[S.R]) * (lr_max ** s[S.WLR_POWER])
    wsum = s[S.WSUM] + weight
    c = weight / wsum if wsum != 0 else 0.0
    s[S.GAMMA], s[S.LR_MAX], s[S.WSUM], s[S.C] = lr_t, lr_max, wsum, c
    s[S.BIAS2] = 1 - beta2 ** (k + 1)
    s[S.COEF] = lr_t * (beta1 * (1 - c) - 1)
    s[S.K] = k + 1
    return s


@jit
def scalar_kernel(s, PROFILE: tl.constexpr):
    """One program: advance step count, lr_max and Σweight; write lr_t, c, bias2 and coef (PROFILE unused)."""
    _, t, lr, _, in_warmup, ramp = warmup_ramp(s)
    beta1 = tl.load(s + BETA1)
    beta2 = tl.load(s + BETA2)
    r = tl.load(s + R)
    weight_lr_power = tl.load(s + WLR_POWER)
    lr_t = lr * tl.where(in_warmup, ramp, 1.0)
    lr_max = tl.maximum(lr_t, tl.load(s + LR_MAX))
    weight = pow_f64(t, r) * pow_f64(lr_max, weight_lr_power)
    wsum = tl.load(s + WSUM) + weight
    c = tl.where(wsum != 0, weight / tl.where(wsum != 0, wsum, 1.0), 0.0)
    tl.store(s + LR_MAX, lr_max)
    tl.store(s + WSUM, wsum)
    tl.store(s + C, c)
    tl.store(s + BIAS2, 1.0 - pow_f64(beta2, t))
    tl.store(s + COEF, lr_t * (beta1 * (1.0 - c) - 1.0))
    tl.store(s + GAMMA, lr_t)
    tl.store(s + K, t)


def torch_tail(ys: Tensors, zs: Tensors, us: Tensors, s: Sequence[float]) -> None:
    """y <- y + c·(z - y) + coef·u;  z <- z - lr_t·u, with torch's multi-tensor ops."""
    torch._foreach_lerp_(ys, zs, s[S.C])
    torch._foreach_add_(ys, us, alpha=s[S.COEF])
    torch._foreach_sub_(zs, us, alpha=s[S.GAMMA])


@jit
def tail(y_ptr, z_ptr, y, z, u, offs, mask, s):
    """y <- y + c·(z - y) + coef·u;  z <- z - lr_t·u on one tile, in the state dtype; y rounded on store."""
    cdt = z_ptr.dtype.element_ty
    c = tl.load(s + C).to(cdt)
    coef = tl.load(s + COEF).to(cdt)
    lr_t = tl.load(s + GAMMA).to(cdt)
    y = y + c * (z - y) + coef * u
    z = z - lr_t * u
    tl.store(y_ptr + offs, to_param(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(z_ptr + offs, z, mask=mask)
