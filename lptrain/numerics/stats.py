"""Per-call quantization statistics (algorithms.md §8.3), computed on request only.

All values are taken in the quantizer's own domain (after the Hadamard rotation, if any) and
over every element of the operand; `elements` lets a monitor average fractions correctly over
ranks and micro-batches (weighted by elements) while taking the max of `amax`.
"""

from __future__ import annotations

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
            "elements": float(self.elements),
        }


def _empty(x: torch.Tensor) -> QuantStats:
    z = torch.zeros((), dtype=torch.float32, device=x.device)
    return QuantStats(z, torch.ones(1), z, z, z + float("inf"), z, z, z, 0)


def _clamped(spec: QuantSpec, xg, dec, gdec) -> torch.Tensor:
    """Fraction of groups (with a non-zero amax) whose scale left the scale format's range:
    E8M0 exponent clamped at -127 or overflowed (NaN); two-level scale at its max or rounded
    to zero; FP32 encode scale capped (amax too small for the input dtype)."""
    if spec.scaling == "none" or dec is None:
        return torch.zeros(())
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
    return hit.float().sum() / live.sum().clamp(min=1)


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
    dyn = torch.log2(amax / min_nz) if bool(nz.any()) else torch.zeros(())
    scale = dec if dec is not None else torch.ones(())
    if gdec is not None:
        scale = scale * gdec
    n = xg.numel()
    return QuantStats(
        amax=amax,
        scale=scale.detach().reshape(-1) if scale.dim() else scale.reshape(1),
        saturated=((y.abs() > spec.fmt.max_finite) & finite).float().sum() / n,
        underflow=(nz & (q == 0)).sum() / nz.sum().clamp(min=1),
        sqnr_db=sqnr.float(),
        clamped=_clamped(spec, xg, dec, gdec),
        dynamic_range=dyn.float(),
        nonfinite=(~finite).float().sum() / n,
        elements=n,
    )
