"""L4Q (algorithms.md §6): LoRA and LSQ+ quantization of the *merged* weight, trained jointly.

    W_c = W0 + α·B·A,   V = (W_c - b)/s per group,   W_q = s·round(clamp(V, n, p)) + b,
    y = x·W_qᵀ (+ the frozen bias)

Groups are `group_size` consecutive inputs of a row (row-major along the input axis), with one
learnable step `s` and offset `b` each; the grid is signed, n = -2^(bits-1), p = 2^(bits-1)-1.
Only A, B, s, b train; W0 is a frozen parameter (never a .grad, never optimizer state).

Backward (custom, §6; sums over *all* leading dims of x and dy, not the batch-size-1 shortcut
of the code the spec was read from): with G = dyᵀx (out, in) and M = 1[n <= V <= p],

    dx = dy·W_q,   dA = α·Bᵀ(M⊙G),   dB = α·(M⊙G)Aᵀ,
    ds = g·Σ_group G⊙(round(V) - V inside, clamp(V) outside),   db = g·Σ_group G⊙(1 - M)

with g = 1/√(group_size·p). Memory: the Function saves x, W0, A, B, s, b only; W_c, V, W_q and
G are recomputed in row chunks (`chunked.py`) in forward and backward, so no dense (out, in)
temporary outlives a chunk and training memory stays close to plain LoRA's. The init is L4Q's
clipping-free step per group, `s = max(|min W0|/|n|, max W0/p)`, b = 0, B = 0 (so W_c = W0).

Under a precision recipe (the base was an `lptrain.nn.Linear`, converted by `precision`), W_q is
the `weight` operand of that layer's three GEMMs (`L4QRecipeFunction`): the recipe quantizes x,
W_q and dy as it would a plain layer's, then G = ∂L/∂W_q feeds the gradients above. The recipe
rounds W_q = s·I + b onto its own grid (E4M3 with a per-tensor scale for fp8-current), which
holds it exactly only where s·I + b happens to be representable: the GEMM sees that rounding,
and so does the export, which keeps the recipe (docs/finetune.md).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.errors import ConfigError
from lptrain.lora.layer import check_rank
from lptrain.nn.call import CallContext
from lptrain.nn.chunked import chunked_matmul, row_chunks, work_dtype
from lptrain.nn.function import backward_gemms, backward_operands, forward_gemm
from lptrain.qat import lsq as L
from lptrain.qat.layers import features, weight_nk
from lptrain.qat.quantized import QuantizedLinear
from lptrain.qat.quantizer import mark_quantizer_params


class _Rows:
    """W_q (and what backward needs) for rows r0:r1, recomputed from the saved tensors."""

    def __init__(self, w0, A, B, s, b, alpha: float, n: int, p: int, group: int, wd):
        self.w0, self.A, self.B, self.s, self.b = w0, A.to(wd), B.to(wd), s.to(wd), b.to(wd)
        self.alpha, self.n, self.p, self.group, self.wd = alpha, n, p, group, wd
        self.out_features, self.in_features = w0.shape

    def scaled(self, r0: int, r1: int):
        """(W_c rows, V rows grouped (rows, G, group))."""
        wc = self.w0[r0:r1].to(self.wd) + (self.B[r0:r1] @ self.A) * self.alpha
        wcg = wc.reshape(r1 - r0, -1, self.group)
        v = (wcg - self.b[r0:r1].unsqueeze(-1)) / self.s[r0:r1].unsqueeze(-1)
        return wc, v

    def quantized(self, v, r0: int, r1: int) -> torch.Tensor:
        wq = L.dequantize(
            L.codes(v, self.n, self.p), self.s[r0:r1].unsqueeze(-1), self.b[r0:r1].unsqueeze(-1)
        )
        return wq.reshape(r1 - r0, self.in_features)

    def weight_rows(self, r0: int, r1: int) -> torch.Tensor:
        wc, v = self.scaled(r0, r1)
        # Non-finite W0 (or A, B) stays non-finite in W_q: the clamp would hide it.
        return torch.where(torch.isfinite(wc), self.quantized(v, r0, r1), wc)

    def dense(self) -> torch.Tensor:
        """The whole W_q (out, in), written row chunk by row chunk (the same values)."""
        wq = self.w0.new_empty(self.w0.shape, dtype=self.wd)
        for r0, r1 in row_chunks(self.out_features, self.in_features):
            wq[r0:r1] = self.weight_rows(r0, r1)
        return wq

    def new_grads(self) -> tuple[torch.Tensor, ...]:
        """Zeroed dA (accumulated over chunks) and dB, ds, db (written row by row)."""
        return (torch.zeros_like(self.A), torch.empty_like(self.B),
                torch.empty_like(self.s), torch.empty_like(self.b))  # fmt: skip

    def add_grads(self, grads, r0: int, r1: int, v, G, g: float) -> None:
        """The §6 gradients of rows r0:r1 from G = ∂L/∂W_q rows grouped like v."""
        dA, dB, ds, db = grads
        inside = (v >= self.n) & (v <= self.p)
        gm = (G * inside).reshape(r1 - r0, -1)  # M ⊙ G, (rows, in)
        dA.addmm_(self.B[r0:r1].T, gm, alpha=self.alpha)
        dB[r0:r1] = (gm @ self.A.T) * self.alpha
        ds[r0:r1] = (G * L.step_grad_factor(v, self.n, self.p)).sum(-1) * g
        db[r0:r1] = (G * ~inside).sum(-1) * g


class L4QFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, w0, A, B, s, b, alpha: float, n: int, p: int, group: int, g: float):
        wd = work_dtype(x)
        rows = _Rows(w0, A, B, s, b, alpha, n, p, group, wd)
        y = chunked_matmul(x.reshape(-1, x.shape[-1]).to(wd), rows, wd)  # (T, out)
        return y.to(x.dtype).reshape(*x.shape[:-1], w0.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w0, A, B, s, b, alpha, n, p, group, g = inputs
        ctx.save_for_backward(x, w0, A, B, s, b)
        ctx.consts = (alpha, n, p, group, g)

    @staticmethod
    def backward(ctx, dy):
        x, w0, A, B, s, b = ctx.saved_tensors
        alpha, n, p, group, g = ctx.consts
        wd = work_dtype(x)
        R = _Rows(w0, A, B, s, b, alpha, n, p, group, wd)
        x2 = x.reshape(-1, x.shape[-1]).to(wd)  # (T, in): every leading dim, not x[0]
        dy2 = dy.reshape(-1, dy.shape[-1]).to(wd)  # (T, out)
        dx = torch.zeros_like(x2) if ctx.needs_input_grad[0] else None
        grads = R.new_grads()
        for r0, r1 in row_chunks(*w0.shape):
            _, v = R.scaled(r0, r1)
            if dx is not None:
                dx.addmm_(dy2[:, r0:r1], R.quantized(v, r0, r1))
            G = (dy2[:, r0:r1].T @ x2).reshape(v.shape)  # ∂L/∂W_q rows, grouped
            R.add_grads(grads, r0, r1, v, G, g)
            del G, v
        dx = dx.to(x.dtype).reshape(x.shape) if dx is not None else None
        return (dx, None, *_cast(grads, (A, B, s, b)), None, None, None, None, None)


class L4QRecipeFunction(torch.autograd.Function):
    """L4Q under a precision recipe: W_q is the `weight` operand of lptrain.nn.Linear's three
    GEMMs (nn/function.py: the recipe quantizes x and W_q for the output, grad_output and W_q
    for grad_input, grad_output and x for grad_weight), in the layer's dtype, as a LoRA base's
    dequantized weight is. The recipe's weight scales see the whole tensor (a per-tensor
    amax; grad_input's scales run along the out-features), so W_q is built whole, chunk by
    chunk, for each GEMM. It is never saved: like L4QFunction this saves x, W0, A, B, s, b,
    and backward rebuilds W_q, replays the forward GEMM where the recipe's backward reads the
    forward's quantized copies or masks (bit for bit: the same call, its snapshot state),
    runs the two backward GEMMs, and turns ∂L/∂W_q into the §6 gradients chunk by chunk."""

    @staticmethod
    def forward(ctx, x, w0, A, B, s, b, consts: tuple, call: CallContext):
        rows = _Rows(w0, A, B, s, b, *consts[:4], work_dtype(x))
        y, _, _, _, _, fwd_signs = forward_gemm(call, x, rows.dense().to(x.dtype), None)
        ctx.save_for_backward(x, w0, A, B, s, b)
        ctx.consts, ctx.call, ctx.fwd_signs = consts, call, fwd_signs
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w0, A, B, s, b = ctx.saved_tensors
        alpha, n, p, group, g = ctx.consts
        call: CallContext = ctx.call
        R = _Rows(w0, A, B, s, b, alpha, n, p, group, work_dtype(x))
        wq = R.dense().to(x.dtype)  # the forward's weight operand, recomputed
        xq = wq_q = mx = mw = None
        if _reads_forward_copies(call):
            _, xq, wq_q, mx, mw, _ = forward_gemm(_replay(call), x, wq, None)
        operands = backward_operands(call, x, wq, xq, wq_q)
        del wq, xq, wq_q  # only what `operands` holds lives on (an aliased W_q goes now)
        want_dx, want_dw = ctx.needs_input_grad[0], any(ctx.needs_input_grad[2:6])
        tk = (x.shape[:-1].numel(), x.shape[-1])
        dx, dwq = backward_gemms(call, dy, operands, (mx, mw), ctx.fwd_signs, tk, want_dx, want_dw)
        del operands
        grads = (None,) * 4
        if dwq is not None:
            grads = R.new_grads()
            for r0, r1 in row_chunks(*w0.shape):
                _, v = R.scaled(r0, r1)
                R.add_grads(grads, r0, r1, v, dwq[r0:r1].to(R.wd).reshape(v.shape), g)
            grads = _cast(grads, (A, B, s, b))
        dx = dx.to(x.dtype).reshape(x.shape) if dx is not None else None
        return (dx, None, *grads, None, None)


def _cast(grads, like) -> list[torch.Tensor]:
    return [d.to(t.dtype) for d, t in zip(grads, like, strict=True)]


def _reads_forward_copies(call: CallContext) -> bool:
    """Whether the recipe's backward reads the forward GEMM's quantized operands or trust
    masks ('reuse' mode, a trust mask, an alias; nn/function.py `backward_operands`)."""
    r = call.recipe
    aliased = {("grad_weight", "input"), ("grad_input", "weight")} & call.aliases.keys()
    return r.backward_operands == "reuse" or r.trust_mask or bool(aliased)


def _replay(call: CallContext) -> CallContext:
    """The forward call again, as activation checkpointing replays it: its quantizer state as
    that call first saw it, nothing updated or recorded a second time."""
    return replace(call, recompute=True) if call.training else call


def _recipe_layer(base: nn.Module) -> lpnn.Linear | None:
    """`base` when it is an lptrain.nn.Linear whose recipe quantizes, with its weight and bias
    removed (L4Q holds them): its recipe, backend, seed, counters and quantizer state run L4Q's
    GEMMs (as a LoRA base's do, lora/layer.py). Else None."""
    if not (isinstance(base, lpnn.Linear) and base.recipe.quantizes):
        return None
    base.register_parameter("weight", None)
    base.register_parameter("bias", None)
    return base.requires_grad_(False)


def l4q_init_step(w0: torch.Tensor, n: int, p: int, group: int) -> torch.Tensor:
    """Clipping-free symmetric step per group (§6): max(|min W0|/|n|, max W0/p), (out, G)."""
    wg = w0.detach().float().reshape(w0.shape[0], -1, group)
    wg = torch.where(torch.isfinite(wg), wg, torch.zeros_like(wg))
    s = torch.maximum(wg.amin(-1).abs() / abs(n), wg.amax(-1) / p)
    return s.clamp_min(1e-8)


class L4QLinear(nn.Module):
    """An L4Q layer: frozen `weight` (W0, out x in), trainable lora_A, lora_B, step, offset."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, bits: int = 4,
                 group_size: int = 128):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = features(base)
        if not 2 <= bits <= 8:
            raise ConfigError("bits", f"must be in 2..8, got {bits}")
        if group_size < 1 or self.in_features % group_size:
            raise ConfigError(
                "group_size", f"{group_size} does not divide in_features {self.in_features}"
            )
        check_rank(r, self.in_features, self.out_features)
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.bits, self.group_size = bits, group_size
        self.n, self.p = L.bounds(bits, signed=True)
        w0 = weight_nk(base).detach()
        # Our own (out, in) copy, contiguous: a GPT-2 Conv1D's weight_nk is a transposed view,
        # and DeepSpeed views every parameter as bytes (stride(-1) must be 1).
        self.weight = nn.Parameter(w0.clone(memory_format=torch.contiguous_format),
                                   requires_grad=False)  # fmt: skip
        bias = getattr(base, "bias", None)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w0.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w0.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.step = nn.Parameter(l4q_init_step(w0, self.n, self.p, group_size))
        self.offset = nn.Parameter(torch.zeros_like(self.step))
        mark_quantizer_params(self.step, self.offset)
        self.recipe_layer = _recipe_layer(base)

    def grad_scale(self) -> float:
        return L.grad_scale(self.group_size, self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = (x, self.weight, self.lora_A, self.lora_B, self.step, self.offset)
        consts = (self.scaling, self.n, self.p, self.group_size, self.grad_scale())
        call = self.recipe_layer.call_context(x) if self.recipe_layer is not None else None
        if call is not None:  # the recipe's three GEMMs
            y = L4QRecipeFunction.apply(*tensors, consts, call)
        else:
            y = L4QFunction.apply(*tensors, *consts)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def export(self) -> QuantizedLinear:
        """The deployable layer: I = round(clamp(V)) as `bits`-bit integers plus (s, b) per
        group. Its forward is the training forward bit for bit (same values, same chunks)."""
        wd = torch.float32
        R = _Rows(self.weight, self.lora_A, self.lora_B, self.step, self.offset, self.scaling,
                  self.n, self.p, self.group_size, wd)  # fmt: skip
        # Chunk by chunk like the training forward: B[rows]·A is the same GEMM, same bits.
        q = torch.cat(
            [L.codes(R.scaled(r0, r1)[1], self.n, self.p).reshape(r1 - r0, -1)
             for r0, r1 in row_chunks(self.out_features, self.in_features)]
        )  # fmt: skip
        m = QuantizedLinear(self.in_features, self.out_features, "affine")
        m.set_affine(q, self.step, self.offset, bits=self.bits, group_size=self.group_size,
                     n=self.n)  # fmt: skip
        m.set_bias(self.bias)
        if self.recipe_layer is not None:  # the recipe's GEMMs and state: the same forward
            m.recipe_layer = copy.deepcopy(self.recipe_layer)
        return m.to(self.weight.device)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, bits={self.bits}, group_size={self.group_size}"
        )
