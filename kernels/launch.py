"""Host side of the fused quantize kernel: allocate the outputs asked for, pick tile sizes,
launch `quantize_kernel`, return a `KernelResult`. The named entry points (fp8.py, block.py,
dfp.py) compute the scales that need the whole tensor first and call `launch`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from lptrain.kernels._core import fmt_args
from lptrain.kernels.quantize import (
    BLOCK_2LVL,
    BLOCK_E8M0,
    BLOCK_FP32,
    BLOCK_GIVEN,
    ROW,
    TENSOR,
    quantize_kernel,
)
from lptrain.numerics import get_format
from lptrain.numerics.formats import Format

TENSOR_MODE, ROW_MODE = TENSOR, ROW
BLOCK_MODES = {"fp32": BLOCK_FP32, "e8m0": BLOCK_E8M0, "ue4m3": BLOCK_2LVL, "ue5m3": BLOCK_2LVL}
GIVEN_MODE = BLOCK_GIVEN


@dataclass
class KernelResult:
    """What one launch produced (None where not asked for). Layouts, for an (R, C) operand:
    codes (R, C) (FP4 packed: (R, C // 2)); codes_t (C, R): the transposed copy or the
    column-wise copy; scales: per-group decode scales as FP32 values, (R // gr, C // gc);
    dense (R, C); mask (R, C) bool; amax: abs_max of the input (0-d; NaN/Inf when it holds
    one) and amax_bad whether it does. The entry points
    fill scales / scales_t / global_scale for the scales they computed with torch."""

    codes: torch.Tensor | None = None
    codes_t: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    scales_t: torch.Tensor | None = None  # the column-wise copy's scales, (C, 1)
    global_scale: torch.Tensor | None = None  # two-level S_dec (0-d)
    dense: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    amax: torch.Tensor | None = None
    amax_bad: torch.Tensor | None = None


def codes_dtype(fmt: Format) -> torch.dtype:
    if fmt.is_int:
        return torch.int16 if fmt.bits > 8 else torch.int8
    return torch.uint8


def no_specials(fmt: Format) -> bool:
    """A format with no NaN code: a non-finite element makes its whole scale group NaN."""
    return fmt.nan == "none"


def tile_shape(group: tuple[int, int], hadamard: int | None) -> tuple[int, int]:
    """(BR, BC): multiples of the group and the rotation, at most 16K elements (registers)."""
    gr, gc = group
    bc = max(128, gc, hadamard or 1)
    br = max(gr, min(32, 16384 // bc))
    return br, bc


def launch(
    x: torch.Tensor,
    fmt: str | Format,
    mode: int,
    *,
    group: tuple[int, int] = (1, 1),
    enc: torch.Tensor | None = None,
    dec: torch.Tensor | None = None,
    col_enc: torch.Tensor | None = None,
    hadamard: int | None = None,
    signs: torch.Tensor | None = None,
    seed: int | None = None,
    codes: bool = True,
    transpose: bool = False,
    dense: torch.dtype | None = None,
    dense_global: bool = False,
    mask: bool = False,
    scales: bool = False,
    amax: bool = False,
    **consts,
) -> KernelResult:
    """Launch the quantize kernel on a 2-D operand (quantized along its last axis).

    `seed` turns on stochastic rounding; `consts` are the kernel's remaining constexprs (POW2,
    HEADROOM, IN_MAX, E8M0_CEIL, EMAX_ELEM, ZERO_GUARD and the S_* scale format)."""
    fmt = get_format(fmt)
    R, C = x.shape
    dev = x.device
    gr, gc = group
    pack = codes and fmt.bits == 4 and not fmt.is_int and C % 2 == 0
    out = KernelResult()
    if codes:
        out.codes = torch.empty(R, C // 2 if pack else C, dtype=codes_dtype(fmt), device=dev)
    if transpose or col_enc is not None:
        out.codes_t = torch.empty(C, R, dtype=codes_dtype(fmt), device=dev)
    if scales:
        out.scales = torch.empty(R // gr, C // gc, device=dev)
    if dense is not None:
        out.dense = torch.empty(R, C, dtype=dense, device=dev)
    if mask:
        out.mask = torch.empty(R, C, dtype=torch.int8, device=dev)
    br, bc = tile_shape(group, hadamard)
    grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
    partial = torch.zeros(grid[0] * grid[1], 2, device=dev) if amax else None
    if x.numel():
        dummy = torch.empty(2, device=dev)
        pick = lambda t: t if t is not None else dummy  # noqa: E731
        quantize_kernel[grid](
            x,
            R,
            C,
            x.stride(0),
            x.stride(1),
            pick(enc),
            pick(dec),
            pick(col_enc),
            pick(signs),
            int(seed or 0),
            pick(out.codes),
            pick(out.codes_t),
            pick(out.dense),
            pick(out.scales),
            pick(out.mask),
            pick(partial),
            BR=br,
            BC=bc,
            MODE=mode,
            GR=gr,
            GC=gc,
            **fmt_args(fmt),
            HAD_LOG2N=int(math.log2(hadamard)) if hadamard else 0,
            HAD_SCALE=1.0 / math.sqrt(hadamard) if hadamard else 1.0,
            SIGNS=signs is not None,
            STOCHASTIC=seed is not None,
            NAN_GROUPS=no_specials(fmt),
            WRITE_CODES=codes,
            PACK4=pack,
            WRITE_T=transpose,
            COLWISE=col_enc is not None,
            WRITE_DENSE=dense is not None,
            DENSE_GLOBAL=dense_global,
            WRITE_MASK=mask,
            WRITE_SCALES=scales,
            WRITE_AMAX=amax,
            enable_fp_fusion=False,  # no FMA contraction: every rounding as the reference
            num_warps=8 if br * bc >= 8192 else 4,  # 128x128 tiles: keep registers per thread
            **consts,
        )
    if out.mask is not None:
        out.mask = out.mask.bool()
    if amax:  # (finite max, non-finite code) per tile, finished as kernels/amax.py does
        from lptrain.kernels.amax import _reference_max

        fin, code = partial.amax(0) if x.numel() else torch.zeros(2, device=dev)
        out.amax, out.amax_bad = _reference_max(fin, code)
    return out
