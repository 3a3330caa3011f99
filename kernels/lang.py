"""The Triton vocabulary the optimizer modules are written in: slot names, exact float math, table lookups.

Every element-wise kernel is launched over a :class:`~bitpipe_fx.kernels.tables.TensorTable`:
program ``pid`` finds its tensor with :func:`locate` and that tensor's typed pointers with
:func:`address`, then runs the optimizer's tile on ``BLOCK`` elements, unmasked on full blocks
(vector accesses when the table is aligned), masked on a tensor's last block. Offsets are int64
throughout, so tensors over 2^31 elements are fine.

The slot indices of :mod:`.scalars` appear here as compile-time constants under the same names,
so a tile reads ``beta2 = tl.load(s + BETA2)``. Without triton installed the jit functions stay
plain Python functions that nothing calls: only the torch path runs then.
"""

from __future__ import annotations

from bitpipe_fx.kernels import scalars as S

try:  # triton is an optional extra (bitpipe-fx[kernels]); the CPU path needs none of this module
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def jit(fn):
    """triton.jit when triton is installed, else `fn` unchanged (defined, never launched)."""
    return triton.jit(fn) if triton is not None else fn


def _constexpr(value: int):
    return tl.constexpr(value) if tl is not None else value


# Slot indices (see scalars) as compile-time constants: Triton kernels may only read constexpr globals.
LR, BETA1, BETA2, EPS, WD = (_constexpr(i) for i in (S.LR, S.BETA1, S.BETA2, S.EPS, S.WD))
WARMUP, R, WLR_POWER = (_constexpr(i) for i in (S.WARMUP, S.R, S.WLR_POWER))
TOTAL, MIN_LR, REX_D = (_constexpr(i) for i in (S.TOTAL, S.MIN_LR, S.REX_D))
K, LR_MAX, WSUM = (_constexpr(i) for i in (S.K, S.LR_MAX, S.WSUM))
GAMMA, C, BIAS2, COEF, DECAY = (_constexpr(i) for i in (S.GAMMA, S.C, S.BIAS2, S.COEF, S.DECAY))
# Profile codes, for scalar kernels that branch on their PROFILE at compile time.
CONSTANT, LINEAR, COSINE = (_constexpr(int(p)) for p in (S.Profile.CONSTANT, S.Profile.LINEAR, S.Profile.COSINE))


@jit
def pow_f64(base, exponent):
    """base ** exponent for base >= 0 in float64, with 0 ** 0 = 1 as in Python."""
    safe = tl.where(base > 0, base, 1.0)
    powered = tl.exp(tl.log(safe) * exponent)
    return tl.where(base > 0, powered, tl.where(exponent == 0, 1.0, 0.0))


@jit
def div_rn(a, b):
    """IEEE round-to-nearest division (Triton's plain float32 `/` is approximate)."""
    if a.dtype == tl.float64:
        out = a / b
    else:
        out = tl.div_rn(a, b)
    return out


@jit
def sqrt_rn(a):
    """IEEE round-to-nearest square root (tl.sqrt is approximate in float32)."""
    if a.dtype == tl.float64:
        out = tl.sqrt(a)
    else:
        out = tl.sqrt_rn(a)
    return out


@jit
def to_param(x, dtype):
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


@jit
def warmup_ramp(s):
    """(k, t = k + 1, lr, warm-up steps, whether step k warms up, t / warm-up): where every scalar kernel starts."""
    k = tl.load(s + K)
    lr = tl.load(s + LR)
    warmup = tl.load(s + WARMUP)
    t = k + 1.0
    in_warmup = k < warmup
    return k, t, lr, warmup, in_warmup, t / tl.where(in_warmup, warmup, 1.0)


@jit
def locate(block_tensor, first_block, numels, BLOCK: tl.constexpr):
    """(tensor index, int64 offsets of this program's block, in-bounds mask, whether the block is full)."""
    pid = tl.program_id(0).to(tl.int64)
    tid = tl.load(block_tensor + pid)
    start = (pid - tl.load(first_block + tid)) * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    numel = tl.load(numels + tid)
    return tid, offs, offs < numel, start + BLOCK <= numel


@jit
def address(offsets, n, tid, slot: tl.constexpr, base, ALIGNED: tl.constexpr):
    """Typed pointer of slot `slot` of tensor `tid`: the slot's base tensor plus the element offset in the table.

    When the table is 16-byte aligned, rounding the offset down to a multiple of 16 bytes changes nothing
    but lets the compiler prove the alignment, so full blocks use 128-bit loads and stores.
    """
    off = tl.load(offsets + slot * n + tid)
    if ALIGNED:
        VEC: tl.constexpr = 128 // base.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
        off = (off // VEC) * VEC
    return base + off
