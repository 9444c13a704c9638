"""Scale computation (algorithms.md §2): enc multiplies before rounding, dec after.

Every function here maps an amax (a scalar, one per row, or one per block) to scales; the
grouping itself lives in quantize.py. All math is FP32 with exact exponents (frexp).
"""

from __future__ import annotations

import torch

from lptrain.numerics.formats import Format, get_format
from lptrain.numerics.rounding import round_to_format

FLT_MAX = torch.finfo(torch.float32).max


def fdiv(num: float, den: torch.Tensor) -> torch.Tensor:
    """num / den as one correctly rounded FP32 division (what TE's kernels compute).

    Never write `python_float / tensor`: torch evaluates it as `den.reciprocal() * num`, two
    roundings, which differs in the last bit (e.g. 2688 / 10 -> 268.80002 instead of 268.79999).
    """
    return torch.div(torch.full_like(den, num), den)


def exact_floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 a) for positive finite a, exactly (never via log2, §0)."""
    _, e = torch.frexp(a)
    return e - 1


def exact_ceil_log2(a: torch.Tensor) -> torch.Tensor:
    m, e = torch.frexp(a)
    return torch.where(m == 0.5, e - 1, e)


def pow2_floor(v: torch.Tensor) -> torch.Tensor:
    """Clear the mantissa bits: 2^floor(log2 v) for positive finite v."""
    return torch.ldexp(torch.ones_like(v), exact_floor_log2(v))


def abs_max(t: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """max |t| over `dims` (keepdim), or over everything (a 0-d tensor) when dims is None.

    Reduced with the dimensions put in memory order first. The backward operands are
    transposed views, and torch's CPU reduction over a permuted view is up to 30x slower than
    over the same memory presented contiguously; a max is exact, so the order changes nothing.
    """
    a = t.abs()
    order = sorted(range(a.dim()), key=lambda d: -a.stride(d))
    if dims is None:
        return a.permute(order).amax()
    pos = [order.index(d % a.dim()) for d in dims]
    out = a.permute(order).amax(dim=pos, keepdim=True)
    return out.permute([order.index(d) for d in range(a.dim())])


def current_enc(
    amax: torch.Tensor, fmt_max: float, input_dtype: torch.dtype, pow2: bool = False
) -> torch.Tensor:
    """TE current scaling (§2.1): enc = fmt_max / amax with the kernel's edge cases.

    amax 0, NaN or Inf -> 1; enc Inf (tiny amax) -> the largest finite value of the input dtype.
    """
    amax = amax.to(torch.float32)
    enc = fdiv(fmt_max, amax)
    big = torch.finfo(input_dtype).max if input_dtype != torch.float64 else FLT_MAX
    enc = torch.where(torch.isinf(enc), torch.full_like(enc, big), enc)
    bad = (amax == 0) | ~torch.isfinite(amax)
    enc = torch.where(bad, torch.ones_like(enc), enc)
    return pow2_floor(enc) if pow2 else enc


def delayed_enc(
    history: torch.Tensor, old_enc: torch.Tensor, fmt_max: float, algo: str, margin: int
) -> torch.Tensor:
    """TE DelayedScaling update (§2.2) from an amax history (slot 0 = the current step)."""
    a = history.max() if algo == "max" else history[0]
    new = fdiv(fmt_max, a) / (2.0**margin)
    new = torch.where(torch.isinf(new), torch.full_like(new, FLT_MAX), new)
    ok = torch.isfinite(a) & (a > 0)
    return torch.where(ok, new, old_enc)


def e8m0_exponent(amax: torch.Tensor, fmt: Format, rounding: str) -> torch.Tensor:
    """OCP MX shared exponent (§2.6) as float32 (NaN for an overflowing block).

    floor: floor(log2 amax) - emax_elem (may saturate the block max); ceil: ceil(log2(amax /
    max_elem)) (TE's MXFP8 kernel, never saturates). Zero blocks get -127; exponents below -127
    clamp to -127; above 127 (Inf/NaN in the block) give NaN, which decodes the block to NaN.
    """
    amax = amax.to(torch.float32)
    if rounding == "floor":
        exp = exact_floor_log2(amax) - fmt.emax
    else:
        exp = exact_ceil_log2(amax / fmt.max_finite)
    exp = torch.clamp(exp, min=-127).to(torch.float32)
    exp = torch.where(amax == 0, torch.full_like(exp, -127.0), exp)
    bad = (exp > 127) | ~torch.isfinite(amax)
    return torch.where(bad, torch.full_like(exp, float("nan")), exp)


def std_exponent(std: torch.Tensor, fmt: Format, clip_sigmas: float) -> torch.Tensor:
    """Quartet/QuEST forward scale exponent (§3.6): floor(log2(c . sigma + 1e-8)), c = clip/max.

    Clamped to the E8M0 range (the reference does not clamp; a hardware path must).
    """
    c = torch.tensor(clip_sigmas / fmt.max_finite, dtype=torch.float32)
    exp = exact_floor_log2(c * std.to(torch.float32) + 1e-8).to(torch.float32)
    return torch.clamp(exp, -127.0, 127.0)


def global_enc(ref: torch.Tensor, target: float, fmt_max: float) -> torch.Tensor:
    """Two-level tensor scale (§2.7/§2.8): S_enc = (target . fmt_max) / ref, guarded."""
    ref = ref.to(torch.float32)
    s = fdiv(target * fmt_max, ref)
    s = torch.clamp(s, max=FLT_MAX)
    bad = (ref == 0) | (s == 0) | ~torch.isfinite(ref)
    return torch.where(bad, torch.ones_like(s), s)


def two_level_block_scales(
    amax: torch.Tensor, s_enc: torch.Tensor, fmt: Format, scale_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scale codes s_b (as float32 values) and encode multipliers (§2.7, §2.8).

    Keeps the kernel's FP32 operation order: a_b . (S_enc . (1/fmt_max)), then RNE to the scale
    format; enc_b = min(1 / (s_b . S_dec), FLT_MAX).
    """
    sfmt = get_format(scale_format)
    s_dec = 1.0 / s_enc
    per_unit = s_enc * torch.tensor(1.0 / fmt.max_finite, dtype=torch.float32)
    u = amax.to(torch.float32) * per_unit
    s_b = round_to_format(torch.clamp(u, max=sfmt.max_finite), sfmt)
    if scale_format == "ue5m3":  # zero-scale guard of the UE5M3 recipe
        s_b = torch.where(s_b == 0, torch.ones_like(s_b), s_b)
    enc = torch.clamp(1.0 / (s_b * s_dec), max=FLT_MAX)
    return s_b, enc
