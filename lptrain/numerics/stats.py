"""Per-call quantization statistics (algorithms.md §8.3), computed on request only.

All values are taken in the quantizer's own domain (after the Hadamard rotation, if any) and
over every element of the operand; `elements` lets a monitor average fractions correctly over
ranks and micro-batches (weighted by elements) while taking the max of `amax`.

The opt-in statistics of `monitor.stats` (`SIGNED`: min, max, mean, std; `BLOCKWISE`: the
blockwise dynamic range) each cost passes over the operand of their own; `compute_stats` takes
the statistics wanted and leaves those groups out (NaN: not computed) unless one is listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lptrain.numerics.formats import Format, get_format
from lptrain.numerics.rounding import round_to_format
from lptrain.numerics.scaling import FLT_MAX, abs_max, group_dims
from lptrain.numerics.spec import QuantSpec


@dataclass
class QuantStats:
    """Statistics of one quantization, as 0-dim tensors (`as_dict` turns them into floats)."""

    amax: torch.Tensor  # max |x| over finite elements
    scale: torch.Tensor  # dec per group (scalar for tensor scaling; two-level: s_b . S_dec)
    saturated: torch.Tensor  # fraction of elements with |x . enc| > max finite (they clip)
    underflow: torch.Tensor  # fraction of non-zero inputs that quantize to zero
    sqnr_db: torch.Tensor  # 10 log10(|x|^2 / |x - x_hat|^2) over finite elements
    clamped: torch.Tensor  # fraction of groups whose scale hit the scale format's range
    dynamic_range: torch.Tensor  # log2(max |x| / min non-zero |x|), bits
    nonfinite: torch.Tensor  # fraction of NaN/Inf elements
    rms: torch.Tensor  # sqrt(sum of squares of the finite elements / elements): signal power
    nonzero: torch.Tensor  # count of finite non-zero elements (underflow's denominator)
    groups: torch.Tensor  # count of scale groups with a non-zero amax (clamped's denominator)
    elements: int
    # Signed extremes and the sum of the finite elements (mean = sum / elements; std from the
    # mean and rms, so that it merges exactly like them).
    min: torch.Tensor
    max: torch.Tensor
    sum: torch.Tensor
    # BLOCK-element blocks along the quantizer's axis (`_block_ranges`): the largest in-block
    # dynamic range (bits), how many blocks exceed the element format's range, how many blocks
    # hold a non-zero element (the denominator).
    block_range: torch.Tensor
    blocks_over: torch.Tensor
    blocks: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        scale = self.scale.float()
        n = max(self.elements, 1)
        blocks = float(self.blocks)
        return {
            "amax": float(self.amax),
            "scale_mean": float(scale.mean()),
            "scale_min": float(scale.min()),
            "scale_max": float(scale.max()),
            "saturated": float(self.saturated),
            "underflow": float(self.underflow),
            "clamped": float(self.clamped),
            "sqnr_db": float(self.sqnr_db),
            "dynamic_range": float(self.dynamic_range),
            "nonfinite": float(self.nonfinite),
            "rms": float(self.rms),
            "nonzero": float(self.nonzero),
            "groups": float(self.groups),
            "elements": float(self.elements),
            "min": float(self.min),
            "max": float(self.max),
            "mean": float(self.sum) / n,
            "std": _std(float(self.rms), float(self.sum) / n),
            "block_dynamic_range": float(self.block_range),
            "block_range_exceeded": float(self.blocks_over) / max(blocks, 1.0),
            "blocks": blocks,
        }

    @staticmethod
    def empty_dict() -> dict[str, float]:
        """`as_dict()` of an empty operand (no elements: nothing saturates, nothing is lost)."""
        return _empty(torch.zeros(0)).as_dict()


def sqnr_db(signal: float, error: float) -> float:
    """10 log10(signal / error), the SQNR in dB from the signal and error energies (sums of
    squares): +inf when nothing was lost (error 0), NaN when the error is not finite (a NaN or
    Inf reached the quantized values: non-finite stays non-finite). The one formula for every
    SQNR lptrain logs: GEMM operands (`compute_stats`, `from_moments`) and Adam's stored
    moments (optim/states.py)."""
    if not math.isfinite(error):
        return math.nan
    return 10 * math.log10(signal / error) if error > 0 else math.inf


def _std(rms: float, mean: float) -> float:
    """sqrt(E[x^2] - E[x]^2) (population std; floored at 0 against rounding): relative error
    about 1e-7 (rms / std)^2, negligible unless the mean dwarfs the spread."""
    return math.sqrt(max(rms * rms - mean * mean, 0.0))


def _empty(x: torch.Tensor) -> QuantStats:
    z = torch.zeros((), dtype=torch.float32, device=x.device)
    return QuantStats(
        z, torch.ones(1), z, z, z + float("inf"), z, z, z, z, z, z, 0, z, z, z, z, z, z
    )


# Opt-in statistics computed together (one pass each), and every one of them (`compute_stats`).
SIGNED = ("min", "max", "mean", "std")
BLOCKWISE = ("block_dynamic_range", "block_range_exceeded")
OPTIONAL = (*SIGNED, *BLOCKWISE)

# The blockwise dynamic range looks at blocks of BLOCK consecutive elements along the
# quantizer's axis (the GEMM's reduction axis, after any Hadamard rotation): an MX block, two
# NVFP4 blocks. Fixed for every recipe, so that recipes (and shadows) compare on one scale.
BLOCK = 32


def format_range_bits(fmt: Format) -> float:
    """log2(max finite / smallest positive value) of an element format: the widest spread one
    block can hold with its largest element at the format's max (E4M3 17.8, E2M1 3.6, INT8 7.0)."""
    return math.log2(fmt.max_finite / fmt.min_subnormal)


def _row_length(xg: torch.Tensor, spec: QuantSpec) -> int:
    """Length of the quantizer's axis. `xg` is the axis-last tensor, grouped by reshapes that
    keep the memory order (blocks: (..., n, bs); tiles: (..., R, r, C, c)), so its flat order is
    row after row of that axis."""
    if spec.scaling == "block":
        return xg.shape[-2] * xg.shape[-1]
    return xg.shape[-1] if xg.dim() else 1


def _block_ranges(a: torch.Tensor, row: int, fmt: Format):
    """(largest in-block dynamic range in bits, blocks whose range exceeds `fmt`'s, blocks with a
    non-zero element) over BLOCK-element blocks of rows of length `row` of |x| (`a`). A row whose
    length is not a multiple of BLOCK ends with a shorter block (zero padding changes neither a
    block's max nor its smallest non-zero element). A block of zeros has no range."""
    rows = a.reshape(-1, row)
    if row % BLOCK:
        rows = F.pad(rows, (0, -row % BLOCK))
    b = rows.reshape(-1, BLOCK)
    top = b.amax(-1)
    bottom = torch.where(b > 0, b, torch.full_like(b, float("inf"))).amin(-1)
    live = top > 0
    bits = torch.where(live, torch.log2(top) - torch.log2(bottom), torch.zeros_like(top))
    return bits.max(), (bits > format_range_bits(fmt)).sum(), live.sum()


def _clamped(spec: QuantSpec, xg, dec, gdec) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction, count) of the groups with a non-zero amax, the fraction whose scale left the
    scale format's range: E8M0 exponent clamped at -127 or overflowed (NaN); two-level scale at
    its max or rounded to zero; FP32 encode scale capped (amax too small for the input dtype)."""
    if spec.scaling == "none" or dec is None:
        return torch.zeros(()), torch.zeros(())
    dims = None if spec.scaling in ("tensor", "delayed") else group_dims(spec)
    amax = abs_max(torch.where(torch.isfinite(xg), xg, torch.zeros_like(xg)), dims)
    live = amax > 0
    if spec.two_level:
        sfmt = get_format(spec.scale_format)
        u = amax.float() * (1.0 / gdec) / spec.fmt.max_finite
        hit = (u > sfmt.max_finite) | (round_to_format(torch.clamp(u, max=1e30), sfmt) == 0)
    elif spec.scale_format == "e8m0":
        hit = (dec / spec.headroom <= 2.0**-127) | torch.isnan(dec)
    elif spec.scaling == "delayed":  # a stale scale is not a clamp; `saturated` covers it
        hit = torch.zeros_like(live)
    else:  # enc = fmt_max / amax capped at the largest float
        hit = amax < spec.fmt.max_finite / FLT_MAX
    hit = hit.expand_as(amax) & live
    groups = live.sum()
    return hit.float().sum() / groups.clamp(min=1), groups


def compute_stats(xg, y, q, xh, dec, gdec, spec: QuantSpec, wanted=OPTIONAL) -> QuantStats:
    """xg: the grouped (rotated) input; y = xg . enc; q: grid values; xh: dequantized.
    `wanted`: the statistic names asked for; of the opt-in groups (`SIGNED`, `BLOCKWISE`) only
    those with a name in it are computed, the others are NaN. The rest is always computed."""
    if xg.numel() == 0:
        return _empty(xg)
    finite = torch.isfinite(xg)
    x = torch.where(finite, xg, torch.zeros_like(xg))
    err_t = torch.where(finite, x - xh, torch.zeros_like(x))
    a = x.abs()
    nz = a != 0
    # Norms in the working precision (torch sums in cascade: relative error ~1e-6, i.e.
    # ~1e-5 dB) instead of float64 copies: statistics must stay cheap enough for training.
    err = torch.linalg.vector_norm(err_t).double().square()
    sig = torch.linalg.vector_norm(x).double().square()
    sqnr = torch.tensor(sqnr_db(*torch.stack((sig, err)).tolist()))  # one host sync for both
    amax = a.max()
    min_nz = torch.where(nz, a, torch.full_like(a, float("inf"))).min()
    # A difference of logs: amax / min_nz overflows FP32 when min_nz is subnormal.
    dyn = torch.log2(amax) - torch.log2(min_nz) if bool(nz.any()) else torch.zeros(())
    scale = dec if dec is not None else torch.ones(())
    if gdec is not None:
        scale = scale * gdec
    n = xg.numel()
    clamped, groups = _clamped(spec, xg, dec, gdec)
    nonzero = nz.sum()
    nan = torch.tensor(float("nan"))
    vmin, vmax, total = nan, nan, nan
    if any(s in wanted for s in SIGNED):
        vmin, vmax = torch.aminmax(x)
        total = x.sum()
    block_range, blocks_over, blocks = nan, nan, nan
    if any(s in wanted for s in BLOCKWISE):
        block_range, blocks_over, blocks = _block_ranges(a, _row_length(xg, spec), spec.fmt)
    return QuantStats(
        amax=amax,
        scale=scale.detach().reshape(-1) if scale.dim() else scale.reshape(1),
        saturated=((y.abs() > spec.fmt.max_finite) & finite).float().sum() / n,
        underflow=(nz & (q == 0)).sum() / nonzero.clamp(min=1),
        sqnr_db=sqnr.float(),
        clamped=clamped,
        dynamic_range=dyn.float(),
        nonfinite=(~finite).float().sum() / n,
        rms=torch.sqrt(sig / n).float(),
        nonzero=nonzero,
        groups=groups,
        elements=n,
        min=vmin,
        max=vmax,
        sum=total,
        block_range=block_range.float(),
        blocks_over=blocks_over,
        blocks=blocks,
    )


# ---------------------------------------------------------------- merging (micro-batches, ranks)
#
# Statistics of several quantizations (the micro-batches of one optimizer step, the ranks of a
# data-parallel group) combine through "moments": quantities that merge by SUM, MAX or MIN.
# amax, the scale range and the smallest non-zero magnitude (hence the dynamic range) merge
# exactly; SQNR merges exactly from the signal and error energies (rms^2 * elements and
# signal / 10^(sqnr/10)); fractions are weighted by their own denominators (elements for
# saturated and non-finite, non-zero elements for underflow, live scale groups for clamped), so
# they merge exactly too. The scale mean is weighted by elements (groups of one tensor share a
# size). The signed min and max, the sum (hence mean and, with the signal, std) and the
# blockwise range (MAX of the largest, SUM of the counts) merge exactly as well.

SUM_MOMENTS = ("elements", "nonzero", "groups", "saturated_n", "underflow_n", "clamped_n")
SUM_MOMENTS += ("nonfinite_n", "scale_n", "signal", "error", "sum", "blocks", "blocks_over_n")
MAX_MOMENTS = ("amax", "scale_max", "max", "block_range")
MIN_MOMENTS = ("scale_min", "min_nonzero", "min")


def to_moments(d: dict[str, float]) -> dict[str, float]:
    """An `as_dict()` as mergeable moments (see above)."""
    n = d["elements"]
    signal = d["rms"] ** 2 * n
    sqnr = d["sqnr_db"]
    error = 0.0 if math.isinf(sqnr) and sqnr > 0 else signal / 10 ** (sqnr / 10)
    amax = d["amax"]
    min_nz = amax / 2 ** d["dynamic_range"] if amax > 0 else math.inf
    return {
        "elements": n,
        "nonzero": d["nonzero"],
        "groups": d["groups"],
        "saturated_n": d["saturated"] * n,
        "underflow_n": d["underflow"] * d["nonzero"],
        "clamped_n": d["clamped"] * d["groups"],
        "nonfinite_n": d["nonfinite"] * n,
        "scale_n": d["scale_mean"] * n,
        "signal": signal,
        "error": error,
        "amax": amax if n else -math.inf,
        "scale_max": d["scale_max"] if n else -math.inf,
        "scale_min": d["scale_min"] if n else math.inf,
        "min_nonzero": min_nz,
        "sum": d["mean"] * n,
        "max": d["max"] if n else -math.inf,
        "min": d["min"] if n else math.inf,
        "blocks": d["blocks"],
        "blocks_over_n": d["block_range_exceeded"] * d["blocks"],
        "block_range": d["block_dynamic_range"] if d["blocks"] else -math.inf,
    }


def combine_moments(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    out = {k: a[k] + b[k] for k in SUM_MOMENTS}
    out.update({k: max(a[k], b[k]) for k in MAX_MOMENTS})
    out.update({k: min(a[k], b[k]) for k in MIN_MOMENTS})
    return out


def from_moments(m: dict[str, float]) -> dict[str, float]:
    """Moments back to the `as_dict()` form."""
    n = m["elements"]
    if n == 0:
        return {**QuantStats.empty_dict(), "elements": 0.0}
    amax = m["amax"]
    error, signal = m["error"], m["signal"]
    return {
        "amax": amax,
        "scale_mean": m["scale_n"] / n,
        "scale_min": m["scale_min"],
        "scale_max": m["scale_max"],
        "saturated": m["saturated_n"] / n,
        "underflow": m["underflow_n"] / max(m["nonzero"], 1.0),
        "clamped": m["clamped_n"] / max(m["groups"], 1.0),
        "sqnr_db": sqnr_db(signal, error),
        "dynamic_range": math.log2(amax / m["min_nonzero"]) if amax > 0 else 0.0,
        "nonfinite": m["nonfinite_n"] / n,
        "rms": math.sqrt(signal / n),
        "nonzero": m["nonzero"],
        "groups": m["groups"],
        "elements": n,
        "min": m["min"],
        "max": m["max"],
        "mean": m["sum"] / n,
        "std": _std(math.sqrt(signal / n), m["sum"] / n),
        "block_dynamic_range": m["block_range"] if m["blocks"] else 0.0,
        "block_range_exceeded": m["blocks_over_n"] / max(m["blocks"], 1.0),
        "blocks": m["blocks"],
    }


def merge_stats(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """The statistics of both operands' elements together, from their `as_dict()`s.

    Entries without `elements` (the INT32 accumulator counters) are counts: they add.
    """
    if "elements" not in a:
        return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {*a, *b}}
    return from_moments(combine_moments(to_moments(a), to_moments(b)))
