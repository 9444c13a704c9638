"""Scale computation (algorithms.md §2): enc multiplies before rounding, dec after.

The functions at the top map an amax (a scalar, one per row, or one per block) to scales, all
FP32 with exact exponents (frexp). `spec_scales` at the bottom picks them for a QuantSpec and a
grouped tensor (the grouping itself lives in quantize.py), with the state rules of delayed
scaling and sample-and-hold. Non-finite amaxes follow the references (current scaling: enc 1;
delayed: the scale stays and the amax is not recorded; E8M0: a NaN block; two-level: S_enc 1)
and the groups holding them are reported, so quantize.py can make their elements non-finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lptrain.numerics.formats import Format, get_format
from lptrain.numerics.rounding import binade_quantum, round_to_format
from lptrain.numerics.spec import QuantSpec
from lptrain.numerics.state import ScalingState

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
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    if dims is None:
        if t.numel() == 0:  # torch's amax refuses an empty full reduction; |x| >= 0: max 0
            return t.new_zeros(())
        # max |x| = max(|min x|, |max x|): one pass and no |t| copy (NaN propagates through
        # both; abs() turns a -0 extreme into +0, as |t| would).
        lo, hi = torch.aminmax(t.permute(order))
        return torch.maximum(lo.abs(), hi.abs())
    a = t.abs()
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
    amax: torch.Tensor,
    s_enc: torch.Tensor,
    fmt: Format,
    scale_format: str,
    rounding: str = "nearest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scale codes s_b (as float32 values) and encode multipliers (§2.7, §2.8).

    Keeps the kernel's FP32 operation order: a_b . (S_enc . (1/fmt_max)), then RNE to the scale
    format (TE; a block max clips when RNE rounds the scale down) or, with rounding='ceil', up
    to the next scale value (the block max never clips, at up to one scale step of
    resolution); enc_b = min(1 / (s_b . S_dec), FLT_MAX).
    """
    sfmt = get_format(scale_format)
    s_dec = 1.0 / s_enc
    per_unit = s_enc * torch.tensor(1.0 / fmt.max_finite, dtype=torch.float32)
    u = amax.to(torch.float32) * per_unit
    u = torch.clamp(u, max=sfmt.max_finite)
    s_b = round_to_format(u, sfmt)
    if rounding == "ceil":
        up = torch.clamp(s_b + binade_quantum(s_b, sfmt), max=sfmt.max_finite)
        s_b = torch.where(s_b < u, up, s_b)
    if scale_format == "ue5m3":  # zero-scale guard of the UE5M3 recipe
        s_b = torch.where(s_b == 0, torch.ones_like(s_b), s_b)
    enc = torch.clamp(1.0 / (s_b * s_dec), max=FLT_MAX)
    return s_b, enc


# ---------------------------------------------------------------- scales for a QuantSpec


@dataclass
class Scales:
    enc: torch.Tensor  # multiplies before rounding, broadcastable to the grouped tensor
    dec: torch.Tensor  # per group; two-level: the block scale s_b
    gdec: torch.Tensor | None  # two-level S_dec
    bad: torch.Tensor | None  # groups holding a non-finite element (None: none do)


def _nonfinite_groups(stat: torch.Tensor) -> torch.Tensor | None:
    """Groups whose amax (or std) is NaN/Inf, i.e. that hold a non-finite element; None if
    none do (one reduction over the groups, not over the elements)."""
    return None if bool(torch.isfinite(stat).all()) else ~torch.isfinite(stat)


def group_dims(spec: QuantSpec) -> tuple[int, ...]:
    if spec.scaling == "block" and spec.tile is not None:
        return (-3, -1)
    return (-1,)


def _tensor_ref(amax_t, spec: QuantSpec, state: ScalingState | None, update: bool):
    """Two-level tensor reference: current amax, or sample-and-hold every amax_refresh calls."""
    if spec.amax_refresh == 1 or state is None:
        return amax_t
    refresh = (state.calls % spec.amax_refresh == 0) | (state.ref == 0)
    ref = torch.where(refresh, amax_t, state.ref)
    if update:  # a non-finite amax is used once, never held (it would spoil D calls)
        state.ref.copy_(torch.where(torch.isfinite(ref), ref, state.ref))
    return ref


def _delayed(amax, spec: QuantSpec, state: ScalingState, update: bool) -> torch.Tensor:
    """Use the scale from the previous update, then record amax and update (TE, §2.2).

    delayed_init='current': while the history holds no amax yet, use the scale the update
    would compute from this call's amax (current scaling) instead of TE's initial 1."""
    h = state.amax_history
    enc = state.scale.clone()
    fmt_max = spec.fmt.max_finite
    if spec.delayed_init == "current" and not bool((h > 0).any()):
        enc = delayed_enc(amax.reshape(1), enc, fmt_max, "most_recent", spec.margin)
    if not update:
        return enc
    if bool(torch.isfinite(amax)):  # a NaN/Inf amax would freeze a 'max' history for L steps
        h[0] = amax
    new = delayed_enc(h, state.scale, fmt_max, spec.amax_algo, spec.margin)
    state.scale.copy_(new)
    state.amax_history.copy_(torch.roll(h, -1))
    state.amax_history[0] = 0.0
    return enc


def spec_scales(
    xg: torch.Tensor,
    spec: QuantSpec,
    state: ScalingState | None,
    update: bool,
    in_dtype: torch.dtype,
) -> Scales:
    """Scales for the grouped tensor per `spec` (scaling != 'none'); may update `state`."""
    fmt: Format = spec.fmt
    dims = group_dims(spec)
    if spec.scaling in ("tensor", "delayed"):
        amax = abs_max(xg)
        bad = _nonfinite_groups(amax)
        if state is not None and update:
            amax = state.reduce(amax)
        if spec.scaling == "delayed":
            if state is None:
                raise ValueError("scaling='delayed' needs a ScalingState (state=...)")
            enc = _delayed(amax, spec, state, update)
        else:
            enc = current_enc(amax, fmt.max_finite, in_dtype, spec.pow2_scale)
        enc = enc / spec.headroom
        return Scales(enc, 1.0 / enc, None, bad)
    if spec.scale_from == "std":
        stat = xg.to(torch.float32).std(dim=dims, keepdim=True, correction=0)
    else:
        stat = abs_max(xg, dims)
    bad = _nonfinite_groups(stat)
    if spec.scale_format == "fp32":
        enc = current_enc(stat, fmt.max_finite, in_dtype, spec.pow2_scale) / spec.headroom
        return Scales(enc, 1.0 / enc, None, bad)
    if spec.scale_format == "e8m0":
        if spec.scale_from == "std":
            exp = std_exponent(stat, fmt, spec.clip_sigmas)
        else:
            exp = e8m0_exponent(stat, fmt, spec.block_scale_rounding)
        dec = torch.exp2(exp)
        enc = torch.exp2(-exp)
        if spec.headroom != 1.0:
            enc, dec = enc / spec.headroom, dec * spec.headroom
        return Scales(enc, dec, None, bad)
    # Two-level (NVFP4 / UE5M3): FP32 tensor scale x low-precision block scales.
    amax_t = abs_max(stat)  # max of the finite block maxima = the finite tensor amax
    if state is not None and update:
        amax_t = state.reduce(amax_t)
    ref = _tensor_ref(amax_t, spec, state, update)
    target = spec.scale_target if spec.scale_target is not None else 448.0
    s_enc = global_enc(ref, target, fmt.max_finite)
    s_b, enc = two_level_block_scales(
        stat, s_enc, fmt, spec.scale_format, spec.block_scale_rounding
    )
    return Scales(enc, s_b, 1.0 / s_enc, bad)
