"""Rounding to a format's grid, no scaling (algorithms.md §1.2-1.3).

`round_to_format` is the specification every kernel is tested against. Nearest is
round-to-nearest-even on the exact binade quantum; stochastic is floor + Bernoulli
(implementation A of §1.3): round up with probability (a - lo) / (hi - lo), one uniform per
element drawn from the caller's `torch.Generator`, so runs are reproducible and unbiased.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from lptrain.numerics.formats import Format, get_format

ROUNDINGS = ("nearest", "stochastic")
OVERFLOWS = ("saturate", "ieee")


def check_floating(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{what} must be a float16/bfloat16/float32/float64 tensor, got {x.dtype}")


def _check_modes(rounding: str, overflow: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """FP32 math for every input of 32 bits or fewer (exact upcast); FP64 stays FP64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def binade_quantum(a: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The grid spacing u = 2^(max(E, emin) - M) of each |x| (E exact, from frexp)."""
    _, e = torch.frexp(a)
    exp = torch.clamp(e - 1, min=fmt.emin) - fmt.mbits
    return torch.ldexp(torch.ones_like(a), exp)


def uniform_like(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)


def round_magnitude(
    a: torch.Tensor, fmt: Format, rounding: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Round non-negative magnitudes onto the (unbounded above) grid of `fmt`."""
    u = torch.ones_like(a) if fmt.is_int else binade_quantum(a, fmt)
    t = a / u  # exact: u is a power of two
    if rounding == "nearest":
        return torch.round(t) * u
    t0 = torch.floor(t)
    up = uniform_like(t, generator) < (t - t0)
    return (t0 + up) * u


def apply_overflow(r: torch.Tensor, fmt: Format, overflow: str) -> torch.Tensor:
    """Bound rounded magnitudes r (NaN propagates) to the format's finite range."""
    if not fmt.has_zero:  # E8M0: no zero, the smallest scale is 2^-127
        r = torch.clamp(r, min=fmt.min_normal)
    too_big = r > fmt.max_finite
    if overflow == "saturate" or fmt.is_int:
        return torch.where(too_big, torch.full_like(r, fmt.max_finite), r)
    special = float("inf") if fmt.has_inf else float("nan")
    return torch.where(too_big, torch.full_like(r, special), r)


def overflow_threshold(fmt: Format) -> tuple[float, bool]:
    """(t, inclusive): RNE overflows iff |x| > t (or >= t when inclusive), §1.2 step 8.

    t is the midpoint between max_finite and the next binade step; the tie goes to the even
    neighbour, i.e. up (overflow) exactly when max_finite has an odd last mantissa bit.
    """
    top_quantum = 2.0 ** (fmt.emax - fmt.mbits)
    return fmt.max_finite + top_quantum / 2, int(fmt.max_finite / top_quantum) % 2 == 1


def _fp8_cast(x: torch.Tensor, fmt: Format, overflow: str) -> torch.Tensor:
    # torch's casts are RNE, but whether they saturate differs between versions and dtypes
    # (torch 2.13's float8_e4m3fn cast saturates, Inf included; its e5m2 cast overflows to
    # Inf). Never rely on it: clamp first (TE's reference does the same, §1.2) and, for
    # overflow="ieee", write the overflow value back where RNE exceeds max_finite.
    y = torch.clamp(x, -fmt.max_finite, fmt.max_finite).to(fmt.torch_dtype).to(x.dtype)
    if overflow == "saturate":
        return y
    t, inclusive = overflow_threshold(fmt)
    a = x.abs()
    over = a >= t if inclusive else a > t
    if fmt.has_inf:
        special = torch.copysign(torch.full_like(y, float("inf")), x)
    else:
        special = torch.full_like(y, float("nan"))
    return torch.where(over, special, y)


def _use_torch_cast(x: torch.Tensor, fmt: Format, rounding: str, overflow: str) -> bool:
    """Whether torch's FP8 cast is the fastest exact RNE for this call.

    Measured on CPU (2M float32, one thread): the E5M2 round trip takes ~6 ms (its decode is
    half's top byte), `_round_nearest_fp32` ~14 ms, the E4M3 round trip ~30 ms (its decode is
    a scalar loop). E4M3 with overflow='ieee' keeps the cast for the NaN it writes on overflow.
    """
    if rounding != "nearest" or x.dtype == torch.float64:
        return False
    return fmt.name == "fp8_e5m2" or (fmt.name == "fp8_e4m3" and overflow == "ieee")


def _bits_path_ok(x: torch.Tensor, fmt: Format) -> bool:
    return (
        x.dtype == torch.float32
        and not fmt.is_int
        and fmt.has_zero
        and fmt.subnormals
        and fmt.mbits <= 22
        and fmt.emin >= -125
        and fmt.emin - fmt.mbits >= -126  # every quantum a normal float32
    )


def _round_fp32_bits(
    x: torch.Tensor, fmt: Format, generator: torch.Generator | None
) -> torch.Tensor:
    """Round FP32 `x` stochastically by random-bit addition on its bit pattern, then
    truncation (implementation B of §1.3). (Nearest has its own path, `_round_nearest_fp32`.)

    Signed result on the grid, not yet bounded above (the caller applies overflow).
    For |x| >= min_normal of `fmt` the quantum is 2^(E - M), i.e. the k = 23 - M low bits of the
    FP32 pattern. Adding R ~ U{0 .. 2^k - 1} to the pattern and clearing those bits rounds up
    exactly when R >= 2^k - D (D = the dropped field), so P(up) = D / 2^k = (a - lo) / (hi - lo)
    exactly: unbiased with no approximation. A carry walks into the exponent (correct binade
    crossing); the sign bit is never reached by finite inputs. R comes from torch.randint over
    [0, 2^k), which is exactly uniform: torch reduces one 32-bit draw modulo the range, and 2^k
    divides 2^32. Elements below min_normal (a different quantum) and NaN take the reference
    floor + Bernoulli path (implementation A) on that subset only, `_round_below_normal`.

    The draws follow the logical row-major order, so a transposed `x` (the backward GEMMs'
    grad_output) is copied to that order first: one copy instead of strided passes that made
    the call 1.6x slower (BENCHMARKS.md, "Faster emulation, second pass").
    """
    x = _row_major(x)
    k = 23 - fmt.mbits
    b = x.view(torch.int32)
    inc = torch.randint(0, 1 << k, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    r = inc.add_(b).bitwise_and_(~((1 << k) - 1)).view(torch.float32)
    small = ~(x.abs() >= fmt.min_normal)  # also NaN
    # Flat row-major indices (the reference's draw order), gathered with take and written
    # with index_copy_: 2x cheaper than indexing with one index tensor per dimension. (No
    # `small.any()` first: some element is below min_normal in nearly every scaled tensor.)
    idx = _flat_nonzero(small.reshape(-1))
    if idx.numel():
        r.view(-1).index_copy_(0, idx, _round_below_normal(torch.take(x, idx), fmt, generator))
    return r


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the True elements of a contiguous 1-D bool tensor, ascending (int64).

    On a CPU numpy's flatnonzero gives the same indices 7x faster than torch's nonzero (2M
    elements, one thread: 1.2 against 8.7 ms; with two threads torch's took 13-20 ms), and
    `torch.from_numpy` shares its buffer."""
    if mask.device.type != "cpu":
        return mask.nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """`x.contiguous()`, as a 2-D copy where the trailing dims merge into one: torch copies a
    transposed 2-D view 9x faster than the same memory as a 3-D view (blocks, 2048x1024)."""
    if x.is_contiguous() or x.dim() < 3:
        return x.contiguous()
    return x.flatten(1).contiguous().view(x.shape)


def _round_below_normal(
    xs: torch.Tensor, fmt: Format, generator: torch.Generator | None
) -> torch.Tensor:
    """`round_magnitude(|xs|, fmt, "stochastic")` with the sign of xs, for |xs| < min_normal
    (or NaN) only: there the binade quantum is the constant 2^(emin - M) (a zero's differs, but
    0 rounds to 0 with any quantum), so frexp and ldexp drop out. a / u = a . (1 / u) exactly:
    u is a normal power of two (`_bits_path_ok`), both are the correctly rounded a . 2^(M -
    emin). Same draws, same bits (tests/numerics/test_rounding_stochastic.py)."""
    u = 2.0 ** (fmt.emin - fmt.mbits)
    t = xs.abs().mul_(1.0 / u)
    t0 = torch.floor(t)
    up = uniform_like(t, generator) < t.sub_(t0)
    return torch.copysign(t0.add_(up).mul_(u), xs)


def _f32_bits(v: float) -> int:
    """The float32 bit pattern of `v` as an int (no tensor per call on the rounding path)."""
    return struct.unpack("<i", struct.pack("<f", v))[0]


def _round_nearest_fp32(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """RNE of FP32 `x` onto the grid of `fmt` (unbounded above), in six vectorized passes.

    The reference's round(|x| / u) . u with its sign, where u = binade_quantum(x), but u built
    from the exponent field instead of frexp/ldexp: the field of x, raised to that of
    min_normal (subnormals of the format share its quantum), minus M, is the pattern of
    u = 2^(max(E, emin) - M), a normal float32 (`_bits_path_ok` asks emin - M >= -126).
    x / u is exact and below 2^(M+1), round_ is RNE and keeps the sign (-0 too; RNE is
    symmetric, so no abs/copysign pair is needed), and the product with u is exact. +-Inf
    gives u = 2^(128-M) and stays +-Inf; NaN stays the same NaN. It replaced an integer-
    addition RNE on the bit pattern plus a gathered second pass over the elements below
    min_normal (a quarter or more of a scaled FP4/FP6 block): 5x faster on FP4, same bits
    (tests/numerics/test_rounding.py compares it with ml_dtypes and with the reference).
    """
    min_field = _f32_bits(fmt.min_normal)
    field = x.view(torch.int32) & 0x7F800000
    u = field.clamp_(min=min_field).sub_(fmt.mbits << 23).view(torch.float32)
    return torch.div(x, u).round_().mul_(u)


def round_to_format(
    x: torch.Tensor,
    fmt: str | Format,
    rounding: str = "nearest",
    overflow: str = "saturate",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each element of `x` to the nearest (or a stochastic neighbouring) value of `fmt`.

    Same shape and dtype as `x`; no scaling. NaN stays NaN, signed zeros are kept, subnormals
    are exact. `overflow="saturate"` clamps to +-max finite (Inf too); `"ieee"` gives Inf where
    the format has one, else NaN, like torch's own casts. Integer formats always saturate.
    Unsigned formats map negative inputs to 0 (saturate) or NaN (ieee).
    """
    fmt = get_format(fmt)
    check_floating(x)
    _check_modes(rounding, overflow)
    if _use_torch_cast(x, fmt, rounding, overflow):
        return _fp8_cast(x, fmt, overflow)
    w = x.to(work_dtype(x))
    if _bits_path_ok(w, fmt):
        if rounding == "nearest":
            r = _round_nearest_fp32(w, fmt)
        else:
            r = _round_fp32_bits(w, fmt, generator)
        if overflow == "saturate":
            r = r.clamp_(-fmt.max_finite, fmt.max_finite)  # NaN stays NaN
        else:
            special = float("inf") if fmt.has_inf else float("nan")
            big = torch.copysign(torch.full_like(r, special), r)
            r = torch.where(r.abs() > fmt.max_finite, big, r)
    else:
        r = apply_overflow(round_magnitude(w.abs(), fmt, rounding, generator), fmt, overflow)
        if fmt.signed:
            r = torch.copysign(r, w)
    if not fmt.signed:
        neg = w < 0  # NaN (whatever its sign bit) stays NaN; -0 becomes +0
        r = torch.where(neg, torch.full_like(r, 0.0 if overflow == "saturate" else float("nan")), r)
    return r.to(x.dtype)
