"""FP8 (and any element format) with tensorwise or rowwise scales: reference
lptrain.numerics.fake_quantize / quantize with QuantSpec(scaling='tensor' | 'delayed' | 'row').

Tensorwise current scaling needs the tensor's amax before any element can be scaled: one read
for the amax (kernels/amax.py), one fused pass that scales, rounds, encodes and writes the codes
and, in the same pass, their transpose (the copy the other backward GEMM consumes). Delayed
scaling knows its scale beforehand: a single pass that casts and records the amax. Rowwise: one
read for the row (and column) amaxes, one pass writing the row-scaled codes and, optionally,
the column-scaled copy transposed (wgrad's operand), so the backward never re-reads the
high-precision tensor. The scales themselves come from lptrain.numerics.scaling (torch, on the
tiny amax tensors), so they are the reference's by construction.
"""

from __future__ import annotations

import torch

from lptrain.kernels.amax import amax_2d
from lptrain.kernels.launch import ROW_MODE, TENSOR_MODE, KernelResult, launch, no_specials
from lptrain.numerics import QuantSpec
from lptrain.numerics import scaling as S


def _seed(spec: QuantSpec, seed: int | None) -> int | None:
    if spec.rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding needs a seed")
    return seed if spec.rounding == "stochastic" else None


def current_scales(amax: torch.Tensor, bad: torch.Tensor, spec: QuantSpec, in_dtype):
    """(enc, dec) of tensor / row current scaling from abs_max amaxes (NaN/Inf for a group that
    holds one): the reference's `current_enc(...) / headroom` and `1 / enc`; a group holding a
    NaN/Inf decodes to NaN when the format has no special values."""
    enc = S.current_enc(amax, spec.fmt.max_finite, in_dtype, spec.pow2_scale) / spec.headroom
    dec = 1.0 / enc
    if no_specials(spec.fmt):
        dec = torch.where(bad, torch.full_like(dec, float("nan")), dec)
    return enc, dec


def quantize_tensorwise(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    enc: torch.Tensor | None = None,
    transpose: bool = False,
    codes: bool = True,
    dense: torch.dtype | None = None,
    seed: int | None = None,
    mask: bool = False,
) -> KernelResult:
    """Quantize a 2-D operand with one scale. `enc` given (delayed scaling: the scale from the
    previous update, already divided by the headroom) skips the amax pass and records the
    amax in the cast pass instead (`result.amax`). `transpose` also writes codes.T (8-bit and
    wider codes; packed FP4 has no transposed copy)."""
    if transpose and spec.fmt.bits == 4:
        raise ValueError("a transposed copy of packed 4-bit codes is not supported")
    if enc is None:
        a = amax_2d(x)
        enc, dec = current_scales(a.tensor, a.tensor_bad, spec, x.dtype)
        amax = a.tensor
    else:
        enc = enc.to(torch.float32).reshape(())
        dec = 1.0 / enc
        amax = None
    out = launch(
        x,
        spec.fmt,
        TENSOR_MODE,
        enc=enc.reshape(1),
        dec=dec.reshape(1),
        codes=codes,
        transpose=transpose,
        dense=dense,
        seed=_seed(spec, seed),
        amax=amax is None,
        mask=mask,
    )
    out.scales = dec
    if amax is not None:
        out.amax, out.amax_bad = amax, a.tensor_bad
    elif no_specials(spec.fmt) and bool(out.amax_bad):  # a given scale met a NaN/Inf: the
        out.scales = torch.full_like(dec, float("nan"))  # one group (the tensor) is NaN
        if out.dense is not None:
            out.dense.fill_(float("nan"))
    return out


def quantize_rowwise(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    colwise: bool = False,
    codes: bool = True,
    dense: torch.dtype | None = None,
    seed: int | None = None,
    mask: bool = False,
) -> KernelResult:
    """One scale per row (reference: QuantSpec(scaling='row') along the last axis); `colwise`
    also writes the operand quantized with one scale per column, transposed: (C, R) codes with
    scales_t (C, 1), i.e. what quantizing x.T row-wise gives."""
    a = amax_2d(x, rows=True, cols=colwise)
    enc, dec = current_scales(a.rows, a.rows_bad, spec, x.dtype)
    col_enc = None
    if colwise:
        col_enc, col_dec = current_scales(a.cols, a.cols_bad, spec, x.dtype)
    out = launch(
        x,
        spec.fmt,
        ROW_MODE,
        enc=enc.reshape(-1),
        dec=dec.reshape(-1),
        col_enc=col_enc.reshape(-1) if colwise else None,
        codes=codes,
        dense=dense,
        seed=_seed(spec, seed),
        mask=mask,
    )
    out.scales = dec
    if colwise:
        out.scales_t = col_dec.reshape(-1, 1)
    out.amax, out.amax_bad = a.tensor, a.tensor_bad
    return out
