"""Triton building blocks shared by the quantize kernels: exact exponent arithmetic, rounding
onto a format's grid (RNE and stochastic), code encoding, the block Hadamard butterfly.
Each one is the in-register twin of a lptrain.numerics function (named in its docstring); the
kernels' tests compare whole kernels with those functions bit for bit.

Everything is integer arithmetic on FP32 bit patterns or IEEE operations whose rounding is
pinned (`div_rn`, exact power-of-two products), never the hardware's FP8 conversions: those
differ between GPUs (saturating or not) and Triton's CPU interpreter rounds them wrongly at
binade carries, so a kernel built on them could not match the reference everywhere.

`fmt_args(fmt)` turns a lptrain Format into the constexpr keyword arguments these helpers take.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lptrain.numerics import get_format
from lptrain.numerics.formats import Format

NAN_KINDS = {"none": 0, "fn": 1, "ieee": 2}


def fmt_args(fmt: str | Format, prefix: str = "") -> dict:
    """Constexpr arguments describing `fmt` (prefix them for a second format, e.g. 'S_')."""
    f = get_format(fmt)
    d = {
        "EBITS": f.ebits,
        "MBITS": f.mbits,
        "BIAS": f.bias,
        "EMIN": f.emin,
        "MAXF": float(f.max_finite),
        "MIN_NORMAL": float(f.min_normal),
        "IS_INT": f.is_int,
        "HAS_INF": f.has_inf,
        "NAN_KIND": NAN_KINDS[f.nan],
        # torch's float8 casts put the sign on NaN codes (0x7F | sign); lptrain's encode()
        # gives the other formats one canonical NaN code.
        "TORCH_FP8": f.torch_dtype is not None and f.torch_dtype.is_floating_point,
    }
    return {prefix + k: v for k, v in d.items()}


@triton.jit
def bits_of(x):
    return x.to(tl.int32, bitcast=True)


@triton.jit
def from_bits(b):
    return b.to(tl.float32, bitcast=True)


@triton.jit
def is_finite(x):
    return (bits_of(x) & 0x7F800000) != 0x7F800000


@triton.jit
def exp2i(e):
    """2^e as FP32 for integer e in [-149, 127], exactly (subnormals included); the twin of
    torch.exp2 / ldexp on integral exponents."""
    normal = (tl.minimum(tl.maximum(e, -126), 127) + 127) << 23
    sub = 1 << tl.minimum(tl.maximum(e + 149, 0), 22)
    return from_bits(tl.where(e >= -126, normal, sub))


@triton.jit
def log2_parts(a):
    """(floor(log2 a), a is a power of two) for positive finite FP32 a, subnormals included:
    the twin of lptrain.numerics.scaling.exact_floor_log2 / exact_ceil_log2 (frexp)."""
    sub = (bits_of(a) & 0x7F800000) == 0
    an = tl.where(sub, a * 18446744073709551616.0, a)  # x 2^64, exact
    b = bits_of(an)
    e = ((b >> 23) & 0xFF) - 127 - tl.where(sub, 64, 0)
    return e, (b & 0x7FFFFF) == 0


@triton.jit
def rne_small_int(t):
    """Round-half-even of 0 <= t < 2^22 to an integer: adding 1.5 . 2^23 leaves an ulp of 1."""
    return (t + 12582912.0) - 12582912.0


@triton.jit
def round_grid(
    y,
    rbits,
    STOCHASTIC: tl.constexpr,
    MBITS: tl.constexpr,
    EMIN: tl.constexpr,
    MAXF: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    IS_INT: tl.constexpr,
):
    """y (FP32) onto the grid, saturating at +-MAXF, NaN kept, signed zeros kept: the twin of
    lptrain.numerics.round_to_format(y, fmt, rounding, 'saturate') for RNE and of
    kernels.reference.round_with_bits for stochastic rounding (`rbits`: one uint32 per element,
    ignored for RNE). Inf saturates like the reference's saturating round."""
    a = tl.abs(y)
    if IS_INT:
        quantum: tl.constexpr = 1.0
    else:
        quantum: tl.constexpr = 2.0 ** (EMIN - MBITS)
    t = a * (1.0 / quantum)  # exact: a power of two
    if STOCHASTIC:
        u24 = (rbits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
        t0 = tl.floor(t)
        small = (t0 + (u24 < t - t0).to(tl.float32)) * quantum
    else:
        small = rne_small_int(t) * quantum
    if IS_INT:
        r = small
    else:
        K: tl.constexpr = 23 - MBITS
        b = bits_of(y)
        if STOCHASTIC:
            inc = (rbits & ((1 << K) - 1)).to(tl.int32, bitcast=True)
        else:
            inc = ((b >> K) & 1) + ((1 << (K - 1)) - 1)
        big = tl.abs(from_bits((b + inc) & ~((1 << K) - 1)))
        # below the normal range (and NaN) the quantum is fixed: the small-integer path
        r = tl.where(a >= MIN_NORMAL, big, small)
    r = tl.where(r > MAXF, MAXF, r)  # NaN compares false: stays NaN
    return from_bits(bits_of(r) | (bits_of(y) & -2147483648))  # the sign of y, -0 included


@triton.jit
def encode_grid(
    r,
    EBITS: tl.constexpr,
    MBITS: tl.constexpr,
    BIAS: tl.constexpr,
    EMIN: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    IS_INT: tl.constexpr,
    HAS_INF: tl.constexpr,
    NAN_KIND: tl.constexpr,
    TORCH_FP8: tl.constexpr,
):
    """Codes (int32) of on-grid FP32 values: the twin of lptrain.numerics.encode (and, for FP8,
    of torch's float8 casts of on-grid values). Integers: two's complement of the value."""
    if IS_INT:
        return r.to(tl.int32)
    b = bits_of(r)
    sign = (b >> 31) & 1
    a = tl.abs(r)
    SHIFT: tl.constexpr = EBITS + MBITS
    E_ALL: tl.constexpr = (1 << EBITS) - 1
    M_MASK: tl.constexpr = (1 << MBITS) - 1
    normal = a >= MIN_NORMAL
    ab = bits_of(a)
    biased = tl.where(normal, ((ab >> 23) & 0xFF) - 127 + BIAS, 0)
    sub = tl.where(normal | (r != r), 0.0, a)  # NaN never reaches the integer cast
    mant_sub = (sub * (2.0 ** (MBITS - EMIN))).to(tl.int32)  # exact: an integer < 2^MBITS
    mant = tl.where(normal, (ab >> (23 - MBITS)) & M_MASK, mant_sub)
    code = (sign << SHIFT) | (biased << MBITS) | mant
    if HAS_INF:
        code = tl.where(a == float("inf"), (sign << SHIFT) | (E_ALL << MBITS), code)
    nan = r != r
    if NAN_KIND == 1:
        nan_code = (E_ALL << MBITS) | M_MASK
    elif NAN_KIND == 2:
        nan_code = (E_ALL << MBITS) | (1 << (MBITS - 1))
    else:
        nan_code = 0  # no NaN code: a NaN element lives in a NaN scale (OCP MX rule)
    if TORCH_FP8:
        code = tl.where(nan, 0x7F | (sign << 7), code)
    else:
        code = tl.where(nan, nan_code, code)
    return code


@triton.jit
def _stage(x, BR: tl.constexpr, BC: tl.constexpr, H: tl.constexpr):
    """One butterfly stage: view the axis as [BC/(2H), 2, H], write (a + b, a - b)."""
    v = tl.permute(tl.reshape(x, (BR, BC // (2 * H), 2, H)), (0, 1, 3, 2))
    lo, hi = tl.split(v)
    return tl.reshape(tl.permute(tl.join(lo + hi, lo - hi), (0, 1, 3, 2)), (BR, BC))


@triton.jit
def hadamard_rows(x, signs_ptr, BR: tl.constexpr, BC: tl.constexpr, LOG2N: tl.constexpr,
                  SCALE: tl.constexpr, SIGNS: tl.constexpr):  # fmt: skip
    """Orthonormal block Hadamard of size 2^LOG2N (up to 256) along the last axis of a [BR, BC]
    tile (BC a multiple of the size): the twin of lptrain.numerics.hadamard (signs first, then
    the butterfly stages h = 1, 2, 4, ... in the same add/subtract order as `_butterfly`, then
    the FP32 constant SCALE = 1/sqrt(n)). The stages are spelled out: a stage's width must be a
    compile-time constant, which a loop counter is not."""
    if SIGNS:  # one sign per position within a rotation block (a vector of length 2^LOG2N)
        sg = tl.load(signs_ptr + (tl.arange(0, BC) % (1 << LOG2N)))
        x = x * sg[None, :]
    if LOG2N > 0:
        x = _stage(x, BR, BC, 1)
    if LOG2N > 1:
        x = _stage(x, BR, BC, 2)
    if LOG2N > 2:
        x = _stage(x, BR, BC, 4)
    if LOG2N > 3:
        x = _stage(x, BR, BC, 8)
    if LOG2N > 4:
        x = _stage(x, BR, BC, 16)
    if LOG2N > 5:
        x = _stage(x, BR, BC, 32)
    if LOG2N > 6:
        x = _stage(x, BR, BC, 64)
    if LOG2N > 7:
        x = _stage(x, BR, BC, 128)
    return x * SCALE
