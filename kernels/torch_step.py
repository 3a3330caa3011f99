"""The CPU path: the same updates as the Triton kernels, written with torch's multi-tensor ops.

Each function takes lists of same-dtype tensors (the caller converts low-precision parameters
to the state dtype and back) and the slot values of this step as Python floats. The operation
order is the ``schedulefree`` package's foreach path and torch.optim.AdamW's, so float64 runs
agree with them to rounding and float32 runs nearly bit for bit. Gradients are never written.
"""

from __future__ import annotations

import torch

from bitpipe_fx.kernels import scalars as S

Tensors = list[torch.Tensor]


def _schedule_free_tail(ys: Tensors, zs: Tensors, us: Tensors, s: list[float]) -> None:
    """y <- y + c·(z - y) + γ·(β1·(1-c) - 1)·u;  z <- z - γ·u."""
    torch._foreach_lerp_(ys, zs, s[S.C])
    torch._foreach_add_(ys, us, alpha=s[S.COEF])
    torch._foreach_sub_(zs, us, alpha=s[S.GAMMA])


def sf_adamw(ys: Tensors, gs: Tensors, zs: Tensors, vs: Tensors, s: list[float]) -> None:
    """Schedule-Free AdamW: v, then u = g / (sqrt(v / bias2) + eps) + λ·y, then y and z."""
    torch._foreach_mul_(vs, s[S.BETA2])
    torch._foreach_addcmul_(vs, gs, gs, value=1 - s[S.BETA2])
    denom = torch._foreach_sqrt(torch._foreach_div(vs, s[S.BIAS2]))
    torch._foreach_add_(denom, s[S.EPS])
    us = torch._foreach_div(gs, denom)
    if s[S.WD] != 0:
        torch._foreach_add_(us, ys, alpha=s[S.WD])
    _schedule_free_tail(ys, zs, us, s)


def sf_sgd(ys: Tensors, gs: Tensors, zs: Tensors, s: list[float]) -> None:
    """Schedule-Free SGD: u = g + λ·y, then y and z."""
    us = torch._foreach_add(gs, ys, alpha=s[S.WD]) if s[S.WD] != 0 else gs
    _schedule_free_tail(ys, zs, us, s)


def adamw(ys: Tensors, gs: Tensors, ms: Tensors, vs: Tensors, s: list[float]) -> None:
    """AdamW in torch.optim.AdamW's order: decay y, lerp m, update v, y -= γ/bias1 · m / (sqrt(v)/sqrt(bias2) + eps)."""
    torch._foreach_mul_(ys, s[S.DECAY])
    torch._foreach_lerp_(ms, gs, 1 - s[S.BETA1])
    torch._foreach_mul_(vs, s[S.BETA2])
    torch._foreach_addcmul_(vs, gs, gs, value=1 - s[S.BETA2])
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, s[S.BIAS2])
    torch._foreach_add_(denom, s[S.EPS])
    torch._foreach_addcdiv_(ys, ms, denom, value=-s[S.COEF])


def lerp(ys: Tensors, zs: Tensors, weight: float) -> None:
    """Schedule-Free train/eval switch: y <- y + w·(z - y)."""
    torch._foreach_lerp_(ys, zs, weight)
