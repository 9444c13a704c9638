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
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lptrain.errors import ConfigError
from lptrain.lora.layer import check_rank
from lptrain.nn.chunked import chunked_matmul, row_chunks, work_dtype
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
        dA, dB = torch.zeros_like(R.A), torch.empty_like(R.B)
        ds, db = torch.empty_like(R.s), torch.empty_like(R.b)
        for r0, r1 in row_chunks(*w0.shape):
            wc, v = R.scaled(r0, r1)
            if dx is not None:
                dx.addmm_(dy2[:, r0:r1], R.quantized(v, r0, r1))
            G = (dy2[:, r0:r1].T @ x2).reshape(v.shape)  # ∂L/∂W_q rows, grouped
            inside = (v >= n) & (v <= p)
            gm = (G * inside).reshape(r1 - r0, -1)  # M ⊙ G, (rows, in)
            dA.addmm_(R.B[r0:r1].T, gm, alpha=alpha)
            dB[r0:r1] = (gm @ R.A.T) * alpha
            ds[r0:r1] = (G * L.step_grad_factor(v, n, p)).sum(-1) * g
            db[r0:r1] = (G * ~inside).sum(-1) * g
            del G, gm, wc, v
        dx = dx.to(x.dtype).reshape(x.shape) if dx is not None else None
        grads = [dA.to(A.dtype), dB.to(B.dtype), ds.to(s.dtype), db.to(b.dtype)]
        return (dx, None, *grads, None, None, None, None, None)


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

    def grad_scale(self) -> float:
        return L.grad_scale(self.group_size, self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = L4QFunction.apply(
            x, self.weight, self.lora_A, self.lora_B, self.step, self.offset, self.scaling,
            self.n, self.p, self.group_size, self.grad_scale(),
        )  # fmt: skip
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
        return m.to(self.weight.device)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, bits={self.bits}, group_size={self.group_size}"
        )
