"""AdamW (Loshchilov & Hutter) as torch.optim.AdamW computes it, with its lr profile (REX, cosine, ...) on the device.

With t = k + 1 (k steps taken so far), the step's scalars, computed in float64::

    lr_t       = scalars.profile_lr(PROFILE, k, lr, warmup, total, min_lr, d)
    bias2_sqrt = sqrt(1 - β2^t)
    step_size  = lr_t / (1 - β1^t)
    decay      = 1 - lr_t·λ

and per element, in torch.optim.AdamW's operation order::

    y <- decay·y
    m <- m + (1 - β1)·(g - m)
    v <- β2·v + (1 - β2)·g²
    y <- y - step_size · m / (sqrt(v) / bias2_sqrt + eps)

Row slots: (y, g, m, v), i.e. parameter, gradient, then the state ``exp_avg`` and ``exp_avg_sq``.
Traffic: reads y, g, m, v and writes y, m, v (28 B per float32 parameter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.kernels.lang import (
    BETA1,
    BETA2,
    BIAS2,
    COEF,
    CONSTANT,
    COSINE,
    DECAY,
    EPS,
    GAMMA,
    LINEAR,
    MIN_LR,
    REX_D,
    TOTAL,
    WD,
    K,
    address,
    div_rn,
    jit,
    locate,
    pow_f64,
    sqrt_rn,
    tl,
    to_param,
    warmup_ramp,
)


def advance(profile: S.Profile, slots: Sequence[float]) -> list[float]:
    """The slot values after one step (host twin of scalar_kernel)."""
    s = list(slots)
    k = s[S.K]
    lr_t = S.profile_lr(profile, k, s[S.LR], s[S.WARMUP], s[S.TOTAL], s[S.MIN_LR], s[S.REX_D])
    s[S.GAMMA] = lr_t
    s[S.BIAS2] = math.sqrt(1 - s[S.BETA2] ** (k + 1))
    s[S.COEF] = lr_t / (1 - s[S.BETA1] ** (k + 1))
    s[S.DECAY] = 1 - lr_t * s[S.WD]
    s[S.K] = k + 1
    return s


@jit
def scalar_kernel(s, PROFILE: tl.constexpr):
    """One program: advance the step count; write lr_t (warm-up, then PROFILE), bias2_sqrt, step_size, decay."""
    k, t, lr, warmup, in_warmup, ramp = warmup_ramp(s)
    beta1 = tl.load(s + BETA1)
    beta2 = tl.load(s + BETA2)
    weight_decay = tl.load(s + WD)
    if PROFILE == CONSTANT:
        decayed = lr
    else:
        min_lr = tl.load(s + MIN_LR)
        span = tl.maximum(tl.load(s + TOTAL) - warmup, 1.0)
        z = tl.minimum(tl.maximum((k - warmup) / span, 0.0), 1.0)
        if PROFILE == LINEAR:
            shape = 1.0 - z
        elif PROFILE == COSINE:
            shape = 0.5 * (1.0 + tl.cos(tl.full((), 3.141592653589793, tl.float64) * z))
        else:  # REX
            shape = (1.0 - z) / (1.0 - tl.load(s + REX_D) * z)
        decayed = min_lr + (lr - min_lr) * shape
    lr_t = tl.where(in_warmup, lr * ramp, decayed)
    tl.store(s + BIAS2, tl.sqrt(1.0 - pow_f64(beta2, t)))
    tl.store(s + COEF, lr_t / (1.0 - pow_f64(beta1, t)))
    tl.store(s + DECAY, 1.0 - lr_t * weight_decay)
    tl.store(s + GAMMA, lr_t)
    tl.store(s + K, t)


def torch_update(lists: Sequence[list[torch.Tensor]], s: Sequence[float]) -> None:
    """The CPU path in torch.optim.AdamW's order: decay y, lerp m, update v, then the step."""
    ys, gs, ms, vs = lists
    torch._foreach_mul_(ys, s[S.DECAY])
    torch._foreach_lerp_(ms, gs, 1 - s[S.BETA1])
    torch._foreach_mul_(vs, s[S.BETA2])
    torch._foreach_addcmul_(vs, gs, gs, value=1 - s[S.BETA2])
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, s[S.BIAS2])
    torch._foreach_add_(denom, s[S.EPS])
    torch._foreach_addcdiv_(ys, ms, denom, value=-s[S.COEF])


@jit
def tile(y_ptr, g_ptr, m_ptr, v_ptr, offs, mask, s):
    """One tile in the state dtype (scalars rounded once from float64); y rounded on store."""
    cdt = m_ptr.dtype.element_ty
    beta1 = tl.load(s + BETA1)
    beta2 = tl.load(s + BETA2)
    decay = tl.load(s + DECAY).to(cdt)
    bias2_sqrt = tl.load(s + BIAS2).to(cdt)
    eps = tl.load(s + EPS).to(cdt)
    step_size = tl.load(s + COEF).to(cdt)
    y = tl.load(y_ptr + offs, mask=mask).to(cdt)
    g = tl.load(g_ptr + offs, mask=mask).to(cdt)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    y = y * decay
    m = m + (1.0 - beta1).to(cdt) * (g - m)
    v = v * beta2.to(cdt) + (1.0 - beta2).to(cdt) * (g * g)
    y = y - step_size * div_rn(m, div_rn(sqrt_rn(v), bias2_sqrt) + eps)
    tl.store(y_ptr + offs, to_param(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@jit
def step_kernel(offsets, n, block_tensor, first_block, numels, s, y_base, g_base, state_base,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Every tensor of a table, one block per program: slots y, g, m, v (m and v share state_base's dtype)."""
    tid, offs, mask, full = locate(block_tensor, first_block, numels, BLOCK)
    y_ptr = address(offsets, n, tid, 0, y_base, ALIGNED)
    g_ptr = address(offsets, n, tid, 1, g_base, ALIGNED)
    m_ptr = address(offsets, n, tid, 2, state_base, ALIGNED)
    v_ptr = address(offsets, n, tid, 3, state_base, ALIGNED)
    if full:
        tile(y_ptr, g_ptr, m_ptr, v_ptr, offs, None, s)
    else:
        tile(y_ptr, g_ptr, m_ptr, v_ptr, offs, mask, s)
