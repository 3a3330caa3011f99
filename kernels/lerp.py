"""Schedule-Free's train/eval switch, y <- y + w·(z - y), on one tile in Triton and on lists of tensors in torch.

``eval()`` moves the parameters from y to the average x with w = 1 - 1/β1 (slot EVAL_W),
``train()`` back with w = 1 - β1 (slot TRAIN_W); the weight is read from the group's scalar
table, so a switch needs no host sync either. Row slots: (y, z).
"""

from __future__ import annotations

import torch

from bitpipe_fx.kernels.lang import address, jit, locate, tl, to_param


def torch_lerp(ys: list[torch.Tensor], zs: list[torch.Tensor], weight: float) -> None:
    """The CPU path: y <- y + w·(z - y)."""
    torch._foreach_lerp_(ys, zs, weight)


@jit
def tile(y_ptr, z_ptr, offs, mask, w):
    """One tile in z's dtype (w rounded once from float64); y rounded on store."""
    cdt = z_ptr.dtype.element_ty
    y = tl.load(y_ptr + offs, mask=mask).to(cdt)
    z = tl.load(z_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, to_param(y + w.to(cdt) * (z - y), y_ptr.dtype.element_ty), mask=mask)


@jit
def lerp_kernel(offsets, n, block_tensor, first_block, numels, s, y_base, z_base,
                W_SLOT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Every tensor of a table, one block per program: slots y, z; w read from slot W_SLOT."""
    tid, offs, mask, full = locate(block_tensor, first_block, numels, BLOCK)
    y_ptr = address(offsets, n, tid, 0, y_base, ALIGNED)
    z_ptr = address(offsets, n, tid, 1, z_base, ALIGNED)
    w = tl.load(s + W_SLOT)
    if full:
        tile(y_ptr, z_ptr, offs, None, w)
    else:
        tile(y_ptr, z_ptr, offs, mask, w)
