"""LSQ and LSQ+ fake quantizers (algorithms.md §5) with a custom autograd Function.

One Function serves both: LSQ is LSQ+ without the offset. With `v` the input, `s` the step,
`β` the offset (0 for LSQ) and integer bounds `(n, p)`:

    u = (v - β) / s,   v̂ = round(clamp(u, n, p)) · s + β          (round: ties to even)

Backward (straight-through for `round`; the clamp boundaries count as inside, like every
reference code, §5.1):

    ∂L/∂v = ∂L/∂v̂ · 1[n ≤ u ≤ p]
    ∂L/∂s = g · Σ_group ∂L/∂v̂ · (round(u) - u  inside,  n below,  p above)
    ∂L/∂β = g · Σ_group ∂L/∂v̂ · (0 inside, 1 outside)                      (LSQ+, §5.2)

`g = 1/√(N·p)` is the step-gradient scale with N the number of elements sharing one step
(a tensor, a channel's row or a group). For activations we take N = the number of features
(the last dim), the paper's reading, not `x.numel()` as the reference codes do: that way g
does not change with the batch size, gradient accumulation or the data-parallel split.

Granularities (weights (out, in)): `tensor` one step, `channel` one per output row, `group`
one per `group_size` consecutive inputs of a row (row-major groups along the input axis).
"""

from __future__ import annotations

import math

import torch

GRANULARITIES = ("tensor", "channel", "group")


def bounds(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid (n, p): signed [-2^(b-1), 2^(b-1)-1], unsigned [0, 2^b - 1] (§5.1)."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def grad_scale(n_elements: int, p: int) -> float:
    """LSQ's step-gradient scale g = 1/√(N·Q_P) (§5.1)."""
    return 1.0 / math.sqrt(max(n_elements, 1) * p)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def dequantize(q: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """`q·s + β`: the one formula shared by training forwards and exported models, so an
    export reproduces the training forward bit for bit."""
    out = q * step
    return out if offset is None else out + offset


def codes(u: torch.Tensor, n: int, p: int) -> torch.Tensor:
    """Integer codes (as floats) of the scaled input u = (v - β)/s."""
    return torch.round(u.clamp(n, p))


def step_grad_factor(u: torch.Tensor, n: int, p: int) -> torch.Tensor:
    """∂v̂/∂s per element: round(u) - u inside [n, p], n below, p above (§5.1)."""
    inside = (u >= n) & (u <= p)
    return torch.where(inside, torch.round(u) - u, u.clamp(n, p))


def _scaled(v, step, offset):
    return (v - offset) / step if offset is not None else v / step


class LSQFunction(torch.autograd.Function):
    """v̂ = LSQ+(v; s, β). `v` is already grouped so that `step` (and `offset`) broadcast to
    it; gradients of s and β are summed back to their shapes."""

    @staticmethod
    def forward(v, step, offset, n: int, p: int, g: float):
        wd = work_dtype(v)
        vw, s = v.to(wd), step.to(wd)
        b = offset.to(wd) if offset is not None else None
        out = dequantize(codes(_scaled(vw, s, b), n, p), s, b)
        # House rule: non-finite inputs stay non-finite (clamp would make ±Inf finite).
        return torch.where(torch.isfinite(vw), out, vw).to(v.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        v, step, offset, n, p, g = inputs
        ctx.save_for_backward(v, step, offset)
        ctx.n, ctx.p, ctx.g = n, p, g

    @staticmethod
    def backward(ctx, dy):
        v, step, offset = ctx.saved_tensors
        n, p, g = ctx.n, ctx.p, ctx.g
        wd = work_dtype(v)
        s = step.to(wd)
        b = offset.to(wd) if offset is not None else None
        u = _scaled(v.to(wd), s, b)
        dyw = dy.to(wd)
        inside = (u >= n) & (u <= p)
        dv = ds = db = None
        if ctx.needs_input_grad[0]:
            dv = (dyw * inside).to(v.dtype)
        if ctx.needs_input_grad[1]:
            ds = (dyw * step_grad_factor(u, n, p)).sum_to_size(step.shape) * g
            ds = ds.to(step.dtype)
        if offset is not None and ctx.needs_input_grad[2]:
            db = (dyw * (~inside)).sum_to_size(offset.shape) * g
            db = db.to(offset.dtype)
        return dv, ds, db, None, None, None


def lsq_fake_quantize(v, step, offset, n: int, p: int, g: float) -> torch.Tensor:
    """Functional LSQ/LSQ+ fake quantization (see the module docstring)."""
    return LSQFunction.apply(v, step, offset, n, p, g)


def ste_reference(v, step, offset, n: int, p: int, g: float) -> torch.Tensor:
    """The straight-through surrogate the custom backward must equal (autograd through it):
    gradient-scaled step and offset (value s, gradient × g), native clamp, STE round."""
    s = step * g + (step - step * g).detach()
    b = offset * g + (offset - offset * g).detach() if offset is not None else None
    u = _scaled(v, s, b).clamp(n, p)
    q = u + (torch.round(u) - u).detach()
    return q * s + (b if b is not None else 0.0)
