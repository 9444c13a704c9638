"""Double Rounding weight quantization (algorithms.md §7.1) with a custom autograd Function.

Candidate bit-widths share one per-output-channel scale `s`; `h` is the highest (storage)
bit-width. For the active bit-width b, with d = h - b and the signed grid [n, p] =
[-2^(b-1), 2^(b-1) - 1]:

    I_h = round(W / s)                          first rounding (not clamped in training)
    I_b = clamp(round(I_h / 2^d), n, p)         second rounding ("double rounding")
    Ŵ_b = I_b · (s · 2^d)

`round` is torch.round (ties to even) in both steps; `rounding="shift"` replaces the second
one by floor(I_h / 2^d), an arithmetic right shift of the integer (the paper's ablation).
Deployment stores only I_h clamped to h bits (int8 for h = 8) and s: clamping first changes
nothing for b < h, since 127 / 2^d rounds (or shifts) to the b-bit extreme either way (§7.1).

Backward, with v = W / (s·2^d) and inside = n <= v <= p (boundaries inside, as LSQ):

    ∂L/∂W = inside ⊙ ∂L/∂Ŵ                                      (straight-through)
    corrected (default): ∂L/∂s_c = g · Σ_{row c} ∂L/∂Ŵ ⊙ 2^d·(I_b - v  inside, n below, p above)
    faithful:            ∂L/∂s_c = g · Σ_{whole tensor} ∂L/∂Ŵ ⊙ (round(v) - v  inside, n, p)

`corrected` is the exact straight-through derivative of the forward above (the surrogate
`ste_reference`); `faithful` reproduces the reference code's two quirks (§7.1): no 2^d factor,
and one whole-tensor sum handed to every channel's scale. g = 1/√(N_c·p), N_c = in_features.
"""

from __future__ import annotations

import math

import torch

ROUNDINGS = ("nearest", "shift")
SCALE_GRADS = ("corrected", "faithful")


def signed_bounds(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def weight_grad_scale(in_features: int, bits: int) -> float:
    """g = 1/√(N_c·p) with N_c the weights per output channel (§7.1)."""
    return 1.0 / math.sqrt(max(in_features, 1) * signed_bounds(bits)[1])


def work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def second_round(i_h: torch.Tensor, d: int, bits: int, rounding: str = "nearest") -> torch.Tensor:
    """I_b from the h-bit integers (as floats or ints): round(I_h/2^d) or floor (right shift),
    clamped to the b-bit grid. Division by 2^d is exact in floating point."""
    if rounding not in ROUNDINGS:  # any other name once fell through to floor, silently
        raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {rounding!r}")
    n, p = signed_bounds(bits)
    x = i_h if i_h.is_floating_point() else i_h.to(torch.float32)
    if d:
        x = x / 2**d
        x = torch.round(x) if rounding == "nearest" else torch.floor(x)
    return x.clamp(n, p)


def codes(w: torch.Tensor, s: torch.Tensor, bits: int, h: int, rounding: str) -> torch.Tensor:
    """I_b (as floats) of a weight w with per-channel scale s (broadcasting)."""
    return second_round(torch.round(w / s), h - bits, bits, rounding)


def storage_codes(w: torch.Tensor, s: torch.Tensor, h: int) -> torch.Tensor:
    """What deployment keeps: I_h = clamp(round(W/s), -2^(h-1), 2^(h-1)-1) as int8."""
    if h > 8:
        raise ValueError(f"bits: storage in int8 needs h <= 8, got {h}")
    wd = work_dtype(w)
    return codes(w.to(wd), s.to(wd), h, h, "nearest").to(torch.int8)


def dequantize(q: torch.Tensor, s: torch.Tensor, d: int) -> torch.Tensor:
    """Ŵ = q · (s·2^d): the one formula shared by training and exports (bit for bit)."""
    return q * (s * 2**d)


def _scale_grad_factor(v, q, n: int, p: int, d: int, faithful: bool) -> torch.Tensor:
    """∂Ŵ/∂s per element (without g): see the module docstring."""
    inside = (v >= n) & (v <= p)
    if faithful:
        return torch.where(inside, torch.round(v) - v, v.clamp(n, p))
    return torch.where(inside, q - v, v.clamp(n, p)) * 2**d


class DoubleRoundingFunction(torch.autograd.Function):
    """Ŵ_b = DoubleRound(W; s). `step` (out, 1) broadcasts over W (out, in)."""

    @staticmethod
    def forward(w, step, bits: int, h: int, rounding: str, faithful: bool, g: float):
        wd = work_dtype(w)
        ww, s = w.to(wd), step.to(wd)
        out = dequantize(codes(ww, s, bits, h, rounding), s, h - bits)
        # House rule: non-finite weights stay non-finite (the clamp would make ±Inf finite).
        return torch.where(torch.isfinite(ww), out, ww).to(w.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, step, bits, h, rounding, faithful, g = inputs
        ctx.save_for_backward(w, step)
        ctx.args = (bits, h, rounding, faithful, g)

    @staticmethod
    def backward(ctx, dy):
        w, step = ctx.saved_tensors
        bits, h, rounding, faithful, g = ctx.args
        n, p = signed_bounds(bits)
        d = h - bits
        wd = work_dtype(w)
        ww, s, dyw = w.to(wd), step.to(wd), dy.to(wd)
        v = ww / (s * 2**d)
        dw = ds = None
        if ctx.needs_input_grad[0]:
            dw = (dyw * ((v >= n) & (v <= p))).to(w.dtype)
        if ctx.needs_input_grad[1]:
            q = codes(ww, s, bits, h, rounding) if not faithful else None
            terms = dyw * _scale_grad_factor(v, q, n, p, d, faithful)
            if faithful:  # quirk (b): one sum over the whole tensor, broadcast to every channel
                ds = terms.sum().expand(step.shape) * g
            else:
                ds = terms.sum_to_size(step.shape) * g
            ds = ds.to(step.dtype).contiguous()
        return dw, ds, None, None, None, None, None


def double_round(
    w: torch.Tensor,
    step: torch.Tensor,
    bits: int,
    h: int,
    *,
    rounding: str = "nearest",
    faithful: bool = False,
    g: float | None = None,
) -> torch.Tensor:
    """Functional Double Rounding fake quantization of a 2-D weight (module docstring)."""
    if g is None:
        g = weight_grad_scale(w.shape[-1], bits)
    return DoubleRoundingFunction.apply(w, step, bits, h, rounding, faithful, g)


def ste_reference(w, step, bits: int, h: int, rounding: str, g: float) -> torch.Tensor:
    """The straight-through surrogate whose autograd gradients the `corrected` backward must
    equal: gradient-scaled step (value s, gradient × g), native clamp, STE codes."""
    n, p = signed_bounds(bits)
    d = h - bits
    s = step * g + (step - step * g).detach()
    v = (w / (s * 2**d)).clamp(n, p)
    q = v + (codes(w, step, bits, h, rounding) - v).detach()
    return q * (s * 2**d)


def faithful_reference_scale_grad(w, step, dy, bits: int, h: int, g: float) -> torch.Tensor:
    """The reference's scale gradient written out in float64 (its quirks (a) and (b))."""
    n, p = signed_bounds(bits)
    w64, s64, dy64 = (t.detach().double() for t in (w, step, dy))
    v = w64 / (s64 * 2 ** (h - bits))
    c = torch.where(v < n, float(n), torch.where(v > p, float(p), torch.round(v) - v))
    return torch.full_like(s64, float((dy64 * c).sum()) * g)
