"""y = x·Wᵀ with a frozen W that is *produced* row-chunk by row-chunk (dequantized, or for L4Q
quantized from W0 + αBA), so no dense (out, in) float copy ever lives longer than one chunk.

Forward and backward walk the same chunks (`row_chunks`), which also makes an exported model
that dequantizes the same rows reproduce the training forward bit for bit: each chunk is the
same GEMM on the same values. The chunk holds at most `CHUNK_ELEMS` weights (1 MiB in fp32):
small next to any layer worth quantizing, large enough for an efficient GEMM.
"""

from __future__ import annotations

from typing import Protocol

import torch

CHUNK_ELEMS = 1 << 18


class RowSource(Protocol):
    out_features: int
    in_features: int

    def weight_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of the (out, in) weight as float32 (float64 when asked)."""


def row_chunks(out_features: int, in_features: int, max_elems: int | None = None):
    rows = max(1, (max_elems or CHUNK_ELEMS) // max(in_features, 1))
    return [(r, min(r + rows, out_features)) for r in range(0, out_features, rows)]


def work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunked_matmul(x2: torch.Tensor, source: RowSource, dtype: torch.dtype) -> torch.Tensor:
    """(T, in) @ Wᵀ -> (T, out), one row chunk of W at a time."""
    chunks = row_chunks(source.out_features, source.in_features)
    if len(chunks) == 1:
        return x2 @ source.weight_rows(0, source.out_features).to(dtype).T
    y = x2.new_empty(x2.shape[0], source.out_features)
    for r0, r1 in chunks:
        y[:, r0:r1] = x2 @ source.weight_rows(r0, r1).to(dtype).T
    return y


class FrozenLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ for a frozen W from `source`; saves only x's shape (W is recomputed for dx)."""

    @staticmethod
    def forward(x, source: RowSource):
        wd = work_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(wd)  # (T, in)
        y = chunked_matmul(x2, source, wd)
        return y.to(x.dtype).reshape(*x.shape[:-1], source.out_features)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, source = inputs
        ctx.source, ctx.x_shape, ctx.x_dtype = source, x.shape, x.dtype

    @staticmethod
    def backward(ctx, dy):
        src = ctx.source
        wd = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dy2 = dy.reshape(-1, src.out_features).to(wd)  # (T, out)
        chunks = row_chunks(src.out_features, src.in_features)
        dx = None
        for r0, r1 in chunks:  # dX = dY · W, accumulated over row chunks of W
            part = dy2[:, r0:r1] @ src.weight_rows(r0, r1).to(wd)
            dx = part if dx is None else dx.add_(part)
        return dx.to(ctx.x_dtype).reshape(ctx.x_shape), None


def frozen_linear(x: torch.Tensor, source: RowSource) -> torch.Tensor:
    return FrozenLinearFunction.apply(x, source)
