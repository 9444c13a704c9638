"""Per-call quantization statistics (algorithms.md §8.3), computed on request only.

All values are taken in the quantizer's own domain (after the Hadamard rotation, if any) and
over every element of the operand; `elements` lets a monitor average fractions correctly over
ranks and micro-batches (weighted by elements) while taking the max of `amax`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lptrain.numerics.formats import get_format
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

    def as_dict(self) -> dict[str, float]:
        scale = self.scale.float()
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
        }

    @staticmethod
    def empty_dict() -> dict[str, float]:
        """`as_dict()` of an empty operand (no elements: nothing saturates, nothing is lost)."""
        return _empty(torch.zeros(0)).as_dict()


def _empty(x: torch.Tensor) -> QuantStats:
    z = torch.zeros((), dtype=torch.float32, device=x.device)
    return QuantStats(z, torch.ones(1), z, z, z + float("inf"), z, z, z, z, z, z, 0)


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


def compute_stats(xg, y, q, xh, dec, gdec, spec: QuantSpec) -> QuantStats:
    """xg: the grouped (rotated) input; y = xg . enc; q: grid values; xh: dequantized."""
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
    sqnr = 10 * torch.log10(sig / err) if float(err) > 0 else torch.tensor(float("inf"))
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
# size).

SUM_MOMENTS = ("elements", "nonzero", "groups", "saturated_n", "underflow_n", "clamped_n")
SUM_MOMENTS += ("nonfinite_n", "scale_n", "signal", "error")
MAX_MOMENTS = ("amax", "scale_max")
MIN_MOMENTS = ("scale_min", "min_nonzero")


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
        "sqnr_db": 10 * math.log10(signal / error) if error > 0 else math.inf,
        "dynamic_range": math.log2(amax / m["min_nonzero"]) if amax > 0 else 0.0,
        "nonfinite": m["nonfinite_n"] / n,
        "rms": math.sqrt(signal / n),
        "nonzero": m["nonzero"],
        "groups": m["groups"],
        "elements": n,
    }


def merge_stats(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """The statistics of both operands' elements together, from their `as_dict()`s.

    Entries without `elements` (the INT32 accumulator counters) are counts: they add.
    """
    if "elements" not in a:
        return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {*a, *b}}
    return from_moments(combine_moments(to_moments(a), to_moments(b)))
