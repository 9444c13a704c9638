"""INT16 dynamic fixed point with a shared exponent (Das et al. 2018; algorithms.md §4).

A DFP tensor is T ~= I . 2^E: int16 mantissas I in the symmetric range [-(2^15 - 1), 2^15 - 1]
and one integer exponent E per tensor (or per slice along an axis). E = floor(log2 max|T|) -
(P - 2), P = 16, so the largest magnitude maps into [2^14, 2^15): one sign bit, one bit of
headroom. The GEMM emulation multiplies INT16 x INT16 into INT32 accumulators over chunks of
`chunk` products, wraps each chunk sum exactly as a 32-bit two's-complement register would,
converts chunk sums to FP32 (x 2^(Ea + Eb)) and accumulates the chunks in FP32. Overflows are
detected by computing the chunk sums exactly (float64 is exact for these integer sums) and
comparing with the wrapped value.

Not pinned down by the paper (§9), so options here: rounding (nearest = RNE default, or
stochastic), `chunk` (default 32), `input_shift` (drop low mantissa bits before the GEMM to
lengthen safe chunks) and `overflow`: 'wrap' is the bare INT32 register (two's-complement
wrap-around, the hazard); 'recompute' detects a chunk sum that does not fit INT32 and
recomputes that chunk exactly, as a kernel does with the saturating VP4DPWSSDS plus a 64-bit
redo of the flagged lanes: every chunk sum is then exact. Both count the overflowed sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lptrain.numerics.formats import get_format
from lptrain.numerics.rounding import check_floating, round_magnitude
from lptrain.numerics.scaling import abs_max, exact_floor_log2

INT16_MAX = 2**15 - 1
_INT32 = 2**32


@dataclass
class DFPTensor:
    mantissa: torch.Tensor  # int16
    exponent: torch.Tensor  # int32: scalar, or keepdim-shaped per slice along `axis`

    def dequantize(self) -> torch.Tensor:
        return torch.ldexp(self.mantissa.to(torch.float32), self.exponent)


def dfp_exponent(amax: torch.Tensor, bits: int = 16) -> torch.Tensor:
    """Shared exponent E = floor(log2 amax) - (bits - 2); 0 for an all-zero tensor."""
    e = exact_floor_log2(amax.to(torch.float32)) - (bits - 2)
    return torch.where(amax > 0, e, torch.zeros_like(e)).to(torch.int32)


def dfp_quantize(
    x: torch.Tensor,
    *,
    bits: int = 16,
    rounding: str = "nearest",
    axis: int | None = None,
    generator: torch.Generator | None = None,
    amax: torch.Tensor | None = None,
) -> DFPTensor:
    """Quantize to DFP with one exponent per tensor (axis=None) or per slice along `axis`.

    NaN/Inf inputs have no fixed-point meaning and raise ValueError. `amax`: abs_max(x, axis)
    when the caller already has it (the GEMM does: it saves a pass over the operand).
    """
    check_floating(x)
    if bits < 2 or bits > 16:
        raise ValueError(f"DFP bits must be in 2..16, got {bits}")
    xf = x.to(torch.float32)
    if amax is None:
        amax = abs_max(xf, None if axis is None else (axis,))
    # max propagates NaN and |Inf| is Inf: a finite amax means every element is finite, and
    # checking it costs nothing where isfinite(x).all() is another five passes over x.
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("dfp_quantize: input has NaN or Inf; DFP has no encoding for them")
    exp = dfp_exponent(amax, bits)
    scaled = torch.ldexp(xf, -exp)  # exact: a power-of-two scaling
    lim = 2 ** (bits - 1) - 1
    mag = round_magnitude(scaled.abs(), get_format("int16"), rounding, generator)
    # amax . 2^-E < 2^(bits-1) can still round up to 2^(bits-1): saturate (§4 edge case).
    mag = torch.clamp(mag, max=lim)
    mant = torch.copysign(mag, scaled).to(torch.int16)
    return DFPTensor(mant, exp)


@dataclass
class DFPMatmulResult:
    out: torch.Tensor  # float32
    overflows: int  # chunk sums that did not fit in int32 (and wrapped)
    chunks: int  # number of chunk sums computed


def _wrap_int32(s: torch.Tensor) -> torch.Tensor:
    """Two's-complement 32-bit wrap of exact integer values held in float64."""
    return torch.remainder(s + 2**31, _INT32) - 2**31


OVERFLOWS = ("wrap", "recompute")

# float64 chunk sums held at once (2 MiB, so that the checks, the FP32 conversion and the
# accumulation after each batched GEMM read them from cache: about 2x faster at 2048 x 1024 x
# 1024 than groups of 64 MiB, one thread; BENCHMARKS.md "Faster emulation, second pass").
_BLOCK_ELEMENTS = 2**18


def dfp_matmul(
    a: DFPTensor,
    b: DFPTensor,
    *,
    chunk: int = 32,
    input_shift: int = 0,
    overflow: str = "wrap",
) -> DFPMatmulResult:
    """C = A . B^T for A (M, K) and B (N, K) in DFP with per-tensor exponents.

    Chunked INT32 accumulation along K as described in the module docstring. `input_shift`
    arithmetic-shifts both mantissas right (rounding toward -inf, like a hardware shift) and
    adds the shift to the exponents. `overflow`: 'wrap' (the register) or 'recompute' (exact).
    """
    _check_matmul(a, b, chunk, overflow)
    ia = a.mantissa.to(torch.int32) >> input_shift
    ib = b.mantissa.to(torch.int32) >> input_shift
    scale_exp = int(a.exponent) + int(b.exponent) + 2 * input_shift
    (m, k), n = ia.shape, ib.shape[0]
    out = torch.zeros(m, n, dtype=torch.float32, device=ia.device)
    if out.numel() == 0:  # no rows or no columns: nothing to sum
        return DFPMatmulResult(out, 0, 0)
    nc = -(-k // chunk)
    # Zero-pad K to whole chunks (a zero product changes no integer sum), then view the
    # operands chunk-major without copying: A as (nc, M, chunk), B^T as (nc, chunk, N).
    pad = nc * chunk - k
    fa = F.pad(ia, (0, pad)).to(torch.float64).reshape(m, nc, chunk)
    fb = F.pad(ib, (0, pad)).to(torch.float64).reshape(n, nc, chunk)
    na, nb = _chunk_norms(fa), _chunk_norms(fb)
    fa, fb = fa.transpose(0, 1), fb.permute(1, 2, 0)
    # Row blocks x chunk groups small enough to stay in cache. Every element of `out` still
    # accumulates its chunks in K order, so the blocking changes no bit.
    rows = max(1, min(m, _BLOCK_ELEMENTS // n))
    group = max(1, min(nc, _BLOCK_ELEMENTS // (rows * n)))
    s64 = torch.empty(group, rows, n, dtype=torch.float64, device=ia.device)
    s32 = torch.empty(group, rows, n, dtype=torch.float32, device=ia.device)
    overflows = 0
    for r0 in range(0, m, rows):
        r = min(rows, m - r0)
        acc = out[r0 : r0 + r]
        safe = _no_overflow_possible(na[r0 : r0 + r], nb)
        for start in range(0, nc, group):
            g = min(group, nc - start)
            # Each chunk sum is exact: |product| <= 2^30, so every partial sum of <= 2^23 of
            # them is an integer of magnitude <= 2^53, which float64 holds exactly in any
            # summation order (the BLAS may block, vectorize or fuse as it likes). Buffers are
            # reused: a fresh allocation per GEMM costs more in page faults than the GEMM.
            blk = fa[start : start + g, r0 : r0 + r]
            s = torch.bmm(blk, fb[start : start + g], out=s64[:g, :r])
            if not all(safe[start : start + g]):
                overflows += _int32_overflows(s, overflow)
            sf = s32[:g, :r].copy_(s)  # each chunk sum rounded once to float32 (RNE)
            for i in range(g):  # the FP32 accumulator, chunk after chunk in K order
                _accumulate(acc, sf[i], scale_exp)
    return DFPMatmulResult(out, overflows, m * n * nc)


def _check_matmul(a: DFPTensor, b: DFPTensor, chunk: int, overflow: str) -> None:
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
    if a.mantissa.dim() != 2 or b.mantissa.dim() != 2 or a.mantissa.shape[1] != b.mantissa.shape[1]:
        raise ValueError(
            f"dfp_matmul needs A (M, K) and B (N, K), got {tuple(a.mantissa.shape)} "
            f"and {tuple(b.mantissa.shape)}"
        )
    if a.exponent.numel() != 1 or b.exponent.numel() != 1:
        raise ValueError("dfp_matmul needs per-tensor exponents (axis=None)")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


def _chunk_norms(f: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean norm of each chunk of f (rows, nc, chunk): exact, sums of <= 2^23
    squares <= 2^30 in float64."""
    return f.square().sum(-1)


def _no_overflow_possible(na: torch.Tensor, nb: torch.Tensor) -> list[bool]:
    """Per chunk, whether a bound proves that no chunk sum of these rows can leave INT32.

    na (M, nc) and nb (N, nc) are the chunks' squared norms (`_chunk_norms`). By Cauchy-Schwarz
    a chunk sum obeys |s_ij| <= |a_i| |b_j|, so max_i |a_i|^2 . max_j |b_j|^2 < 2^62 proves
    |s_ij| < 2^31 for every i, j. The float64 product of the exact squared norms is within a
    relative 2^-53 of the true one, so comparing it with 2^62 (1 - 2^-50) keeps the proof
    rigorous. Operands whose chunks are mostly well below the amax (gradients, most
    activations: a chunk's norm is about sqrt(chunk) . sigma, not sqrt(chunk) . amax) pass and
    skip the exact check; the others (and adversarial ones) take it. Taken per block of rows,
    the bound holds for more blocks than over the whole operand.
    """
    bound = na.amax(0) * nb.amax(0)  # (nc,)
    return (bound < 2.0**62 * (1 - 2.0**-50)).tolist()


def _int32_overflows(s: torch.Tensor, overflow: str) -> int:
    """How many exact chunk sums in `s` fall outside INT32; with 'wrap', wrap them in place.

    One cheap pass (aminmax) in the common case; overflow is rarer and pays for the count, on
    the side(s) the extremes show it on."""
    lo, hi = (float(v) for v in torch.aminmax(s))
    outside = 0
    if hi >= 2**31:
        outside += int(torch.count_nonzero(s >= 2**31))
    if lo < -(2**31):
        outside += int(torch.count_nonzero(s < -(2**31)))
    if outside == 0:
        return 0
    if overflow == "wrap":
        s.copy_(_wrap_int32(s))
    return outside


def _accumulate(out: torch.Tensor, chunk_sum: torch.Tensor, exp: int) -> None:
    """out += ldexp(chunk_sum, exp) in float32, one rounding per element.

    When 2^exp is a normal float32, chunk_sum * 2^exp is the exact product rounded once, the
    same value as ldexp (also under a fused multiply-add), and add_ with alpha does it in one
    pass instead of three."""
    if -126 <= exp <= 127:
        out.add_(chunk_sum, alpha=2.0**exp)
    else:
        out += torch.ldexp(chunk_sum, torch.tensor(exp, device=out.device))


def fake_quantize_dfp(
    x: torch.Tensor,
    *,
    bits: int = 16,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return dfp_quantize(x, bits=bits, rounding=rounding, generator=generator).dequantize()
