"""Amax reductions over a 2-D operand: reference lptrain.numerics.scaling.abs_max over the
tensor, each row, each column, with its non-finite rule: the max is NaN when the group holds a
NaN, else +Inf when it holds an Inf, else the max of |x| (the scale functions then apply the
references' rules for non-finite amaxes); `*_bad` says whether a group holds either.

One read of the operand; each program reduces a [BR, BC] tile to partial maxima (the finite
max and a non-finite code, 0 finite / 1 Inf / 2 NaN, whose max is the group's) that torch
finishes (a max is exact, so the order of the partials changes nothing). An optional block
Hadamard rotates the tile first: two-level (NVFP4/UE5M3) scales take the tensor amax of the
rotated operand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lptrain.kernels._core import hadamard_rows, is_finite


@dataclass
class Amax:
    tensor: torch.Tensor  # 0-d float32, abs_max's value (NaN/Inf when the tensor holds one)
    tensor_bad: torch.Tensor  # 0-d bool: some element is NaN/Inf
    rows: torch.Tensor | None = None  # (R, 1)
    rows_bad: torch.Tensor | None = None
    cols: torch.Tensor | None = None  # (1, C)
    cols_bad: torch.Tensor | None = None


@triton.jit
def _amax_kernel(
    x_ptr,
    R,
    C,
    stride_r,
    stride_c,
    signs_ptr,
    tile_ptr,
    row_ptr,
    col_ptr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    HAD_LOG2N: tl.constexpr,
    HAD_SCALE: tl.constexpr,
    SIGNS: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = pid_c * BC + tl.arange(0, BC)
    rm = rows < R
    cm = cols < C
    offs = rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    x = tl.load(x_ptr + offs, mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
    if HAD_LOG2N > 0:
        x = hadamard_rows(x, signs_ptr, BR, BC, HAD_LOG2N, HAD_SCALE, SIGNS)
    fin = is_finite(x)
    a = tl.where(fin, tl.abs(x), 0.0)
    bad = tl.where(fin, 0.0, tl.where(x != x, 2.0, 1.0))  # 1: Inf, 2: NaN
    # per tile: (finite amax, non-finite code) as two floats
    n_c = tl.num_programs(1)
    tile = pid_r * n_c + pid_c
    tl.store(tile_ptr + 2 * tile, tl.max(tl.max(a, axis=1), axis=0))
    tl.store(tile_ptr + 2 * tile + 1, tl.max(tl.max(bad, axis=1), axis=0))
    if ROWS:  # partial row maxima of this column tile: row_ptr is (2, R, n_c)
        ro = rows.to(tl.int64) * n_c + pid_c
        tl.store(row_ptr + ro, tl.max(a, axis=1), mask=rm)
        tl.store(row_ptr + R * n_c + ro, tl.max(bad, axis=1), mask=rm)
    if COLS:  # partial column maxima of this row tile: col_ptr is (2, n_r, C)
        n_r = tl.num_programs(0)
        co = pid_r.to(tl.int64) * C + cols
        tl.store(col_ptr + co, tl.max(a, axis=0), mask=cm)
        tl.store(col_ptr + n_r * C + co, tl.max(bad, axis=0), mask=cm)


def amax_2d(
    x: torch.Tensor,
    *,
    rows: bool = False,
    cols: bool = False,
    hadamard: int | None = None,
    signs: torch.Tensor | None = None,
    block: tuple[int, int] = (32, 64),
) -> Amax:
    """abs_max of a 2-D tensor (any strides) over the tensor and, optionally, each row and
    each column; `hadamard` rotates along the last axis first (its length a multiple of it)."""
    if x.dim() != 2:
        raise ValueError(f"amax_2d needs a 2-D tensor, got shape {tuple(x.shape)}")
    R, C = x.shape
    dev = x.device
    if x.numel() == 0:
        z = torch.zeros((), device=dev)
        no = torch.zeros((), dtype=torch.bool, device=dev)
        return Amax(
            z,
            no,
            torch.zeros(R, 1, device=dev) if rows else None,
            torch.zeros(R, 1, dtype=torch.bool, device=dev) if rows else None,
            torch.zeros(1, C, device=dev) if cols else None,
            torch.zeros(1, C, dtype=torch.bool, device=dev) if cols else None,
        )
    br, bc = block
    if hadamard:
        bc = max(bc, hadamard)
    grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
    tile = torch.empty(grid[0] * grid[1], 2, device=dev)
    row_p = torch.empty(2, R, grid[1], device=dev) if rows else tile
    col_p = torch.empty(2, grid[0], C, device=dev) if cols else tile
    log2n = int(math.log2(hadamard)) if hadamard else 0
    _amax_kernel[grid](
        x,
        R,
        C,
        x.stride(0),
        x.stride(1),
        signs if signs is not None else tile,
        tile,
        row_p,
        col_p,
        BR=br,
        BC=bc,
        ROWS=rows,
        COLS=cols,
        HAD_LOG2N=log2n,
        HAD_SCALE=1.0 / math.sqrt(hadamard) if hadamard else 1.0,
        SIGNS=signs is not None,
        enable_fp_fusion=False,
    )
    t = tile.amax(0)
    out = Amax(*_reference_max(t[0], t[1]))
    if rows:
        r = row_p.amax(2, keepdim=True)  # (2, R, 1)
        out.rows, out.rows_bad = _reference_max(r[0], r[1])
    if cols:
        c = col_p.amax(1, keepdim=True)  # (2, 1, C)
        out.cols, out.cols_bad = _reference_max(c[0], c[1])
    return out


def _reference_max(finite: torch.Tensor, code: torch.Tensor):
    """(abs_max's value: NaN if a NaN, +Inf if an Inf, else the finite max; non-finite?)."""
    special = torch.where(code > 1.5, float("nan"), float("inf"))
    return torch.where(code > 0, special, finite), code > 0
