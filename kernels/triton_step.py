"""Triton kernels: the per-group scalar step and the element-wise optimizer updates.

Every kernel here is launched over a :class:`~bitpipe_fx.kernels.tables.TensorTable`: program
``pid`` looks up which tensor its block belongs to, loads that tensor's element offsets (from
one base tensor per slot) and updates ``BLOCK`` elements of it. Full blocks take an unmasked path (vector
loads when the table says every address is 16-byte aligned), the last block of a tensor a
masked one. Offsets are int64 throughout, so tensors over 2^31 elements are fine.

The math is in the state dtype (float32 for float32/bfloat16/float16 parameters, float64 for
float64 ones); parameters are converted on load and rounded to nearest-even on store (see _to_param).
"""

from __future__ import annotations

import triton
import triton.language as tl

from bitpipe_fx.kernels import scalars as S

# Slot indices as compile-time constants for the kernels.
_LR, _BETA1, _BETA2, _EPS, _WD = (tl.constexpr(S.LR), tl.constexpr(S.BETA1), tl.constexpr(S.BETA2),
                                  tl.constexpr(S.EPS), tl.constexpr(S.WD))
_WARMUP, _R, _P, _TOTAL, _MIN_LR, _D = (tl.constexpr(S.WARMUP), tl.constexpr(S.R), tl.constexpr(S.WLR_POWER),
                                        tl.constexpr(S.TOTAL), tl.constexpr(S.MIN_LR), tl.constexpr(S.REX_D))
_K, _LR_MAX, _WSUM = tl.constexpr(S.K), tl.constexpr(S.LR_MAX), tl.constexpr(S.WSUM)
_GAMMA, _C, _BIAS2, _COEF, _DECAY = (tl.constexpr(S.GAMMA), tl.constexpr(S.C), tl.constexpr(S.BIAS2),
                                     tl.constexpr(S.COEF), tl.constexpr(S.DECAY))
_ADAMW = tl.constexpr(int(S.Kind.ADAMW))
_CONSTANT, _LINEAR, _COSINE = (tl.constexpr(int(S.Profile.CONSTANT)), tl.constexpr(int(S.Profile.LINEAR)),
                                tl.constexpr(int(S.Profile.COSINE)))


@triton.jit
def _pow(base, exponent):
    """base ** exponent for base >= 0 in float64, with 0 ** 0 = 1 as in Python."""
    safe = tl.where(base > 0, base, 1.0)
    powered = tl.exp(tl.log(safe) * exponent)
    return tl.where(base > 0, powered, tl.where(exponent == 0, 1.0, 0.0))


@triton.jit
def _div(a, b):
    """IEEE round-to-nearest division (Triton's plain float32 `/` is approximate)."""
    if a.dtype == tl.float64:
        out = a / b
    else:
        out = tl.div_rn(a, b)
    return out


@triton.jit
def _sqrt(a):
    """IEEE round-to-nearest square root (tl.sqrt is approximate in float32)."""
    if a.dtype == tl.float64:
        out = tl.sqrt(a)
    else:
        out = tl.sqrt_rn(a)
    return out


@triton.jit
def _to_param(x, dtype):
    """Round the float32/float64 result x to the parameter dtype, to nearest-even.

    bfloat16 is rounded with integer arithmetic on the float32 bits (NaN stays NaN): compiled Triton
    rounds fp32 -> bf16 to nearest-even too, but the interpreter truncates, and the tests run there.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = tl.where(x != x, bits | 0x400000, rounded)
        out = (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def scalar_step_kernel(s, KIND: tl.constexpr, PROFILE: tl.constexpr):
    """One program: advance step count, lr_max and weight sum; write γ, c and the bias terms."""
    k = tl.load(s + _K)
    t = k + 1.0
    base = tl.load(s + _LR)
    warmup = tl.load(s + _WARMUP)
    beta1 = tl.load(s + _BETA1)
    beta2 = tl.load(s + _BETA2)
    in_warmup = k < warmup
    ramp = t / tl.where(in_warmup, warmup, 1.0)
    if KIND != _ADAMW:
        gamma = base * tl.where(in_warmup, ramp, 1.0)
        lr_max = tl.maximum(gamma, tl.load(s + _LR_MAX))
        weight = _pow(t, tl.load(s + _R)) * _pow(lr_max, tl.load(s + _P))
        wsum = tl.load(s + _WSUM) + weight
        c = tl.where(wsum != 0, weight / tl.where(wsum != 0, wsum, 1.0), 0.0)
        tl.store(s + _LR_MAX, lr_max)
        tl.store(s + _WSUM, wsum)
        tl.store(s + _C, c)
        tl.store(s + _BIAS2, 1.0 - _pow(beta2, t))
        tl.store(s + _COEF, gamma * (beta1 * (1.0 - c) - 1.0))
    else:
        if PROFILE == _CONSTANT:
            decayed = base
        else:
            min_lr = tl.load(s + _MIN_LR)
            span = tl.maximum(tl.load(s + _TOTAL) - warmup, 1.0)
            z = tl.minimum(tl.maximum((k - warmup) / span, 0.0), 1.0)
            if PROFILE == _LINEAR:
                shape = 1.0 - z
            elif PROFILE == _COSINE:
                shape = 0.5 * (1.0 + tl.cos(tl.full((), 3.141592653589793, tl.float64) * z))
            else:
                shape = (1.0 - z) / (1.0 - tl.load(s + _D) * z)
            decayed = min_lr + (base - min_lr) * shape
        gamma = tl.where(in_warmup, base * ramp, decayed)
        tl.store(s + _BIAS2, tl.sqrt(1.0 - _pow(beta2, t)))
        tl.store(s + _COEF, gamma / (1.0 - _pow(beta1, t)))
        tl.store(s + _DECAY, 1.0 - gamma * tl.load(s + _WD))
    tl.store(s + _GAMMA, gamma)
    tl.store(s + _K, t)


@triton.jit
def _locate(block_tensor, first_block, numels, BLOCK: tl.constexpr):
    """(tensor index, int64 offsets of this program's block, in-bounds mask, whether the block is full)."""
    pid = tl.program_id(0).to(tl.int64)
    tid = tl.load(block_tensor + pid)
    start = (pid - tl.load(first_block + tid)) * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    numel = tl.load(numels + tid)
    return tid, offs, offs < numel, start + BLOCK <= numel


@triton.jit
def _address(offsets, n, tid, slot: tl.constexpr, base, ALIGNED: tl.constexpr):
    """Typed pointer of slot `slot` of tensor `tid`: the slot's base tensor plus the element offset in the table.

    When the table is 16-byte aligned, rounding the offset down to a multiple of 16 bytes changes nothing
    but lets the compiler prove the alignment, so full blocks use 128-bit loads and stores.
    """
    off = tl.load(offsets + slot * n + tid)
    if ALIGNED:
        VEC: tl.constexpr = 128 // base.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
        off = (off // VEC) * VEC
    return base + off


@triton.jit
def _sf_tile(y_ptr, g_ptr, z_ptr, v_ptr, offs, mask, s, ADAM: tl.constexpr):
    """Schedule-Free step of one tile: v, u, y and z in the state dtype, y rounded on store."""
    cdt = z_ptr.dtype.element_ty
    y = tl.load(y_ptr + offs, mask=mask).to(cdt)
    g = tl.load(g_ptr + offs, mask=mask).to(cdt)
    z = tl.load(z_ptr + offs, mask=mask)
    beta2 = tl.load(s + _BETA2)
    if ADAM:
        v = tl.load(v_ptr + offs, mask=mask)
        v = v * beta2.to(cdt) + (1.0 - beta2).to(cdt) * (g * g)
        denom = _sqrt(_div(v, tl.load(s + _BIAS2).to(cdt))) + tl.load(s + _EPS).to(cdt)
        u = _div(g, denom) + tl.load(s + _WD).to(cdt) * y
        tl.store(v_ptr + offs, v, mask=mask)
    else:
        u = g + tl.load(s + _WD).to(cdt) * y
    y = y + tl.load(s + _C).to(cdt) * (z - y) + tl.load(s + _COEF).to(cdt) * u
    z = z - tl.load(s + _GAMMA).to(cdt) * u
    tl.store(y_ptr + offs, _to_param(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(z_ptr + offs, z, mask=mask)


@triton.jit
def sf_step_kernel(offsets, n, block_tensor, first_block, numels, s, y_base, g_base, z_base,
                   ADAM: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Schedule-Free AdamW (ADAM) or SGD over every tensor of a table: slots y, g, z[, v]."""
    tid, offs, mask, full = _locate(block_tensor, first_block, numels, BLOCK)
    y_ptr = _address(offsets, n, tid, 0, y_base, ALIGNED)
    g_ptr = _address(offsets, n, tid, 1, g_base, ALIGNED)
    z_ptr = _address(offsets, n, tid, 2, z_base, ALIGNED)
    v_ptr = z_ptr
    if ADAM:
        v_ptr = _address(offsets, n, tid, 3, z_base, ALIGNED)
    if full:
        _sf_tile(y_ptr, g_ptr, z_ptr, v_ptr, offs, None, s, ADAM)
    else:
        _sf_tile(y_ptr, g_ptr, z_ptr, v_ptr, offs, mask, s, ADAM)


@triton.jit
def _adamw_tile(y_ptr, g_ptr, m_ptr, v_ptr, offs, mask, s):
    """AdamW step of one tile with torch.optim.AdamW's operation order."""
    cdt = m_ptr.dtype.element_ty
    y = tl.load(y_ptr + offs, mask=mask).to(cdt)
    g = tl.load(g_ptr + offs, mask=mask).to(cdt)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    beta1 = tl.load(s + _BETA1)
    beta2 = tl.load(s + _BETA2)
    y = y * tl.load(s + _DECAY).to(cdt)
    m = m + (1.0 - beta1).to(cdt) * (g - m)
    v = v * beta2.to(cdt) + (1.0 - beta2).to(cdt) * (g * g)
    denom = _div(_sqrt(v), tl.load(s + _BIAS2).to(cdt)) + tl.load(s + _EPS).to(cdt)
    y = y - tl.load(s + _COEF).to(cdt) * _div(m, denom)
    tl.store(y_ptr + offs, _to_param(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def adamw_step_kernel(offsets, n, block_tensor, first_block, numels, s, y_base, g_base, z_base,
                      ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """AdamW over every tensor of a table: slots y, g, m, v."""
    tid, offs, mask, full = _locate(block_tensor, first_block, numels, BLOCK)
    y_ptr = _address(offsets, n, tid, 0, y_base, ALIGNED)
    g_ptr = _address(offsets, n, tid, 1, g_base, ALIGNED)
    m_ptr = _address(offsets, n, tid, 2, z_base, ALIGNED)
    v_ptr = _address(offsets, n, tid, 3, z_base, ALIGNED)
    if full:
        _adamw_tile(y_ptr, g_ptr, m_ptr, v_ptr, offs, None, s)
    else:
        _adamw_tile(y_ptr, g_ptr, m_ptr, v_ptr, offs, mask, s)


@triton.jit
def _lerp_tile(y_ptr, z_ptr, offs, mask, w):
    cdt = z_ptr.dtype.element_ty
    y = tl.load(y_ptr + offs, mask=mask).to(cdt)
    z = tl.load(z_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, _to_param(y + w.to(cdt) * (z - y), y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lerp_kernel(offsets, n, block_tensor, first_block, numels, s, y_base, z_base,
                W_SLOT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Schedule-Free train/eval switch: y <- y + w·(z - y) with w read from slot W_SLOT."""
    tid, offs, mask, full = _locate(block_tensor, first_block, numels, BLOCK)
    y_ptr = _address(offsets, n, tid, 0, y_base, ALIGNED)
    z_ptr = _address(offsets, n, tid, 1, z_base, ALIGNED)
    w = tl.load(s + W_SLOT)
    if full:
        _lerp_tile(y_ptr, z_ptr, offs, None, w)
    else:
        _lerp_tile(y_ptr, z_ptr, offs, mask, w)
