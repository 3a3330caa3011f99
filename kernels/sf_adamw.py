"""Schedule-Free AdamW (Defazio et al. 2024): its update on one tile in Triton and on lists of tensors in torch.

Per element, with the step's scalars of :mod:`.schedulefree` (lr_t, c, bias2, coef) and weight
decay λ applied at y::

    v <- β2·v + (1 - β2)·g²
    u  = g / (sqrt(v / bias2) + eps) + λ·y
    y <- y + c·(z - y) + coef·u
    z <- z - lr_t·u

Row slots: (y, g, z, v), i.e. parameter, gradient, then the state ``z`` and ``exp_avg_sq``.
Traffic: reads y, z, v, g and writes y, z, v (28 B per float32 parameter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.kernels import schedulefree
from bitpipe_fx.kernels.lang import BETA2, BIAS2, EPS, WD, address, div_rn, jit, locate, sqrt_rn, tl
from bitpipe_fx.kernels.schedulefree import tail

advance = schedulefree.advance
scalar_kernel = schedulefree.scalar_kernel


def torch_update(lists: Sequence[list[torch.Tensor]], s: Sequence[float]) -> None:
    """The CPU path in the package's foreach order: v, then u = g / (sqrt(v / bias2) + eps) + λ·y, then y and z."""
    ys, gs, zs, vs = lists
    torch._foreach_mul_(vs, s[S.BETA2])
    torch._foreach_addcmul_(vs, gs, gs, value=1 - s[S.BETA2])
    denom = torch._foreach_sqrt(torch._foreach_div(vs, s[S.BIAS2]))
    torch._foreach_add_(denom, s[S.EPS])
    us = torch._foreach_div(gs, denom)
    if s[S.WD] != 0:
        torch._foreach_add_(us, ys, alpha=s[S.WD])
    schedulefree.torch_tail(ys, zs, us, s)


@jit
def tile(y_ptr, g_ptr, z_ptr, v_ptr, offs, mask, s):
    """One tile: v and u in the state dtype (scalars rounded once from float64), then the Schedule-Free tail."""
    cdt = z_ptr.dtype.element_ty
    beta2 = tl.load(s + BETA2)
    bias2 = tl.load(s + BIAS2).to(cdt)
    eps = tl.load(s + EPS).to(cdt)
    weight_decay = tl.load(s + WD).to(cdt)
    y = tl.load(y_ptr + offs, mask=mask).to(cdt)
    g = tl.load(g_ptr + offs, mask=mask).to(cdt)
    z = tl.load(z_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    v = v * beta2.to(cdt) + (1.0 - beta2).to(cdt) * (g * g)
    u = div_rn(g, sqrt_rn(div_rn(v, bias2)) + eps) + weight_decay * y
    tl.store(v_ptr + offs, v, mask=mask)
    tail(y_ptr, z_ptr, y, z, u, offs, mask, s)


@jit
def step_kernel(offsets, n, block_tensor, first_block, numels, s, y_base, g_base, state_base,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Every tensor of a table, one block per program: slots y, g, z, v (z and v share state_base's dtype)."""
    tid, offs, mask, full = locate(block_tensor, first_block, numels, BLOCK)
    y_ptr = address(offsets, n, tid, 0, y_base, ALIGNED)
    g_ptr = address(offsets, n, tid, 1, g_base, ALIGNED)
    z_ptr = address(offsets, n, tid, 2, state_base, ALIGNED)
    v_ptr = address(offsets, n, tid, 3, state_base, ALIGNED)
    if full:
        tile(y_ptr, g_ptr, z_ptr, v_ptr, offs, None, s)
    else:
        tile(y_ptr, g_ptr, z_ptr, v_ptr, offs, mask, s)
