"""The autograd Function holding a Linear's three GEMMs.

All three are written C = A . B^T with both operands quantized along their last axis (the
GEMM's reduction axis), so the backend needs one GEMM routine:

    output      Y  = X  . W^T     A = X   (T, K)   B = W   (N, K)   reduction K
    grad_input  dX = dY . W       A = dY  (T, N)   B = W^T (K, N)   reduction N
    grad_weight dW = dY^T . X     A = dY^T (N, T)  B = X^T (K, T)   reduction T

It saves X (or its forward-quantized copy in 'reuse' mode) and the weight Parameter itself
(ZeRO-3 re-gathers it for backward). It reads nothing from the module: the `CallContext` says
which state it may use and update. Bias and accumulation stay in high precision.

Its three pieces, `forward_gemm`, `backward_operands` and `backward_gemms`, are public so that
a layer that builds its weight itself (L4Q, lora/l4q.py) runs the same GEMMs and recomputes
the weight in backward instead of saving it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lptrain.nn import shadow
from lptrain.nn.call import CallContext
from lptrain.nn.shared import share_key
from lptrain.numerics import hadamard


class LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, call: CallContext):
        y, xq, wq, mx, mw, fwd_signs = forward_gemm(call, x, weight, bias)
        k = x.shape[-1]
        ctx.call = call
        ctx.fwd_signs = fwd_signs
        ctx.shapes = (x.shape, (x.shape[:-1].numel(), k))
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.save_for_backward(*backward_operands(call, x, weight, xq, wq), mx, mw)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        call: CallContext = ctx.call
        x, weight, xq, wq, mx, mw = ctx.saved_tensors
        x_shape, (t, k) = ctx.shapes
        dx, dw = backward_gemms(
            call, dy, (x, weight, xq, wq), (mx, mw), ctx.fwd_signs, (t, k),
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            db = dy2.float().sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        x_dtype, w_dtype = ctx.dtypes
        dx = dx.to(x_dtype).reshape(x_shape) if dx is not None else None
        dw = dw.to(w_dtype) if dw is not None else None
        db = db.to(dy.dtype) if db is not None else None
        return dx, dw, db, None


def forward_gemm(call: CallContext, x, weight, bias):
    """The output GEMM y = x . weight^T (+ bias, added in FP32), as the recipe says.

    Returns (y in the output dtype, shaped like x with out-features last, the quantized
    operands xq and wq as the GEMM saw them, their trust masks mx and mw (or None), the
    forward's Hadamard signs). Reads nothing but its arguments: a forward rerun with the
    same call (or its replay) gives the same values.
    """
    recipe, backend = call.recipe, call.backend
    device_type = x.device.type
    out_dtype = (
        torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    )
    with torch.autocast(device_type, enabled=False):
        x2 = x.reshape(-1, x.shape[-1])  # (T, K)
        gen = call.generator("forward", x.device)
        fwd_signs = call.signs_for("output", gen, x.device)
        key = share_key(call, x) if backend.share_inputs else None
        shared = backend.shared_inputs.get(x, key) if key is not None else None
        # Another layer already quantized x for its output GEMM (nn/shared.py): reuse its copy.
        a, quantized = (shared[0], (True, False)) if shared is not None else (x2, (False, False))
        y, xq, wq, mx, mw = backend.gemm(
            call, "output", a, weight, generator=gen, signs=fwd_signs,
            want_mask=recipe.trust_mask, quantized=quantized,
        )  # fmt: skip
        if shared is not None:
            mx = shared[1]
        elif key is not None and xq is not None:
            backend.shared_inputs.put(x, key, (xq, mx))
        shadow.record_forward(call, x2, weight)  # x2: the high-precision input, shared or not
        if bias is not None:
            y = y + bias.to(y.dtype)
    y = y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])
    return y, xq, wq, mx, mw, fwd_signs


def backward_operands(call: CallContext, x, weight, xq, wq):
    """What backward needs, as (x, weight, xq, wq) with None for what it does not: the
    high-precision operands, or quantized copies it reuses ('reuse' mode: the padded,
    rotated forward values; aliases: the plain copies)."""
    k = x.shape[-1]
    if call.recipe.backward_operands == "reuse":
        return None, None, xq, wq
    x_alias = ("grad_weight", "input") in call.aliases
    w_alias = ("grad_input", "weight") in call.aliases
    return (
        None if x_alias else x,
        None if w_alias else weight,
        xq[:, :k] if x_alias else None,
        wq[:, :k] if w_alias else None,
    )


def backward_gemms(call: CallContext, dy, operands, masks, fwd_signs, tk, want_dx, want_dw):
    """The grad_input and grad_weight GEMMs: (dx (T, K), dw (N, K)), FP32 (FP64 for FP64
    operands), each None unless asked for. `operands` is `backward_operands`' tuple,
    `masks` the forward's (mx, mw), `tk` the forward's (tokens, in-features)."""
    recipe, backend = call.recipe, call.backend
    x, weight, xq, wq = operands
    mx, mw = masks
    t, k = tk
    reuse = recipe.backward_operands == "reuse"
    n_had = recipe.hadamard("output")
    with torch.autocast(dy.device.type, enabled=False):
        dy2 = dy.reshape(-1, dy.shape[-1])  # (T, N)
        shadow.record_backward(call, dy2)
        gen = call.generator("backward", dy.device)
        w_b = wq if wq is not None else weight
        x_b = xq if xq is not None else x.reshape(t, k)
        dx = dw = dyq = None
        if want_dx:
            dx, dyq, _, _, _ = backend.gemm(
                call, "grad_input", dy2, w_b.T, generator=gen,
                signs=call.signs_for("grad_input", gen, dy.device),
                quantized=(False, wq is not None and not reuse),
            )  # fmt: skip
            dx = fwd_domain_grad(dx, mx, fwd_signs, n_had, reuse, k)
        if want_dw:
            if recipe.wgrad_high_precision or not recipe.grad_weight.quantized:
                dw = dy2.T.to(x_b.dtype if x_b.dtype == torch.float64 else torch.float32)
                dw = dw @ x_b.to(dw.dtype)
            else:
                dy_alias = dyq is not None and ("grad_weight", "grad_output") in call.aliases
                a = dyq[:, : dy2.shape[1]].T if dy_alias else dy2.T
                dw, _, _, _, _ = backend.gemm(
                    call, "grad_weight", a, x_b.T, generator=gen,
                    signs=call.signs_for("grad_weight", gen, dy.device),
                    quantized=(dy_alias, xq is not None and not reuse),
                )  # fmt: skip
            dw = fwd_domain_grad(dw, mw, fwd_signs, n_had, reuse, k)
    return dx, dw


def fwd_domain_grad(g: torch.Tensor, mask, signs, n: int | None, reuse: bool, k: int):
    """Map a gradient w.r.t. a GEMM operand back through the forward quantizer's STE.

    In 'reuse' mode g is w.r.t. the forward-quantized (rotated, padded) operand: apply the
    trust mask there, rotate back, crop. In 'requantize' mode g is already w.r.t. the
    high-precision operand; a trust mask is applied in the forward's rotated domain.
    """
    if not reuse and mask is None:
        return g
    if not reuse:  # trust mask in requantize mode: into the rotated, padded domain first
        g = F.pad(g, (0, mask.shape[1] - g.shape[1]))
        if n:
            g = hadamard(g, n, dim=-1, signs=signs)
    if mask is not None:
        g = g * mask[: g.shape[0]]
    if n:
        g = hadamard(g, n, dim=-1, signs=signs, inverse=True)
    return g[:, :k]
