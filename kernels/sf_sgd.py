"""Schedule-Free SGD (Defazio et al. 2024): its update on one tile in Triton and on lists of tensors in torch.

Per element, with the step's scalars of :mod:`.schedulefree` (lr_t, c, coef; β1 is the momentum)
and weight decay λ applied at y::

    u  = g + λ·y
    y <- y + c·(z - y) + coef·u
    z <- z - lr_t·u

Row slots: (y, g, z), i.e. parameter, gradient, then the state ``z``.
Traffic: reads y, z, g and writes y, z (20 B per float32 parameter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bitpipe_fx.kernels import scalars as S
from bitpipe_fx.kernels import schedulefree
from bitpipe_fx.kernels.lang import WD, address, jit, locate, tl
from bitpipe_fx.kernels.schedulefree import tail

advance = schedulefree.advance
scalar_kernel = schedulefree.scalar_kernel


def torch_update(lists: Sequence[list[torch.Tensor]], s: Sequence[float]) -> None:
    """The CPU path: u = g + λ·y (g itself without decay), then y and z."""
    ys, gs, zs = lists
    us = torch._foreach_add(gs, ys, alpha=s[S.WD]) if s[S.WD] != 0 else gs
    schedulefree.torch_tail(ys, zs, us, s)


@jit
def tile(y_ptr, g_ptr, z_ptr, offs, mask, s):
    """One tile: u in the state dtype (λ rounded once from float64), then the Schedule-Free tail."""
    cdt = z_ptr.dtype.element_ty
    weight_decay = tl.load(s + WD).to(cdt)
    y = tl.load(y_ptr + offs, mask=mask).to(cdt)
    g = tl.load(g_ptr + offs, mask=mask).to(cdt)
    z = tl.load(z_ptr + offs, mask=mask)
    u = g + weight_decay * y
    tail(y_ptr, z_ptr, y, z, u, offs, mask, s)


@jit
def step_kernel(offsets, n, block_tensor, first_block, numels, s, y_base, g_base, state_base,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Every tensor of a table, one block per program: slots y, g, z."""
    tid, offs, mask, full = locate(block_tensor, first_block, numels, BLOCK)
    y_ptr = address(offsets, n, tid, 0, y_base, ALIGNED)
    g_ptr = address(offsets, n, tid, 1, g_base, ALIGNED)
    z_ptr = address(offsets, n, tid, 2, state_base, ALIGNED)
    if full:
        tile(y_ptr, g_ptr, z_ptr, offs, None, s)
    else:
        tile(y_ptr, g_ptr, z_ptr, offs, mask, s)
