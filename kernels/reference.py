"""Pure-PyTorch twins of what the kernels add to lptrain.numerics: counter-based random bits and
stochastic rounding fed explicit bits. No Triton here (importable anywhere).

The kernels round stochastically with random bits from Philox4x32-10 (`tl.randint`), keyed by a
per-operand seed and counted by each element's index in the (rows, reduction) operand, so a
result depends on the seed and the data only: not on tile sizes, launch order or the device,
and a resumed run draws the same bits. `philox_bits` reproduces `tl.randint` exactly in int64
arithmetic, so every stochastic kernel has a bit-for-bit reference here:

    kernel(x, seed) == fake_quantize_with_bits(x, spec, philox_bits(seed, arange(numel)))

`round_with_bits` is lptrain.numerics.rounding's rule with the bits made explicit:
* |y| in the normal range: implementation B of algorithms.md §1.3 (add the low k = 23 - M bits
  of the word to the FP32 pattern, clear them), exactly as `_round_fp32_bits` does with its
  `torch.randint` draw, so the two agree bit for bit when fed the same R (tested);
* subnormals and integer formats: implementation A (floor + Bernoulli) with a 24-bit uniform,
  U = (bits >> 8) . 2^-24, round up iff U < frac, as `round_magnitude` does with `torch.rand`.
Both are exactly unbiased, like the reference; only the source of the bits differs.
"""

from __future__ import annotations

import torch

from lptrain.numerics import QuantSpec, get_format, hadamard, round_to_format
from lptrain.numerics.formats import Format

M32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al. 2011), as in triton.language.random.
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mulhi_lo(a: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of a . c for a, c < 2^32, in int64 without overflow: split c
    into 16-bit halves so every partial product stays below 2^48."""
    c_lo, c_hi = c & 0xFFFF, c >> 16
    lo = a * c_lo
    hi = a * c_hi
    high = (hi + (lo >> 16)) >> 16
    low = (lo + ((hi & 0xFFFF) << 16)) & M32
    return high, low


def philox_bits(seed: int, offsets: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """`tl.randint(seed, offsets)`: the first word of Philox4x32-`rounds` with counter
    (offset_lo, offset_hi, 0, 0) and key (seed_lo, seed_hi). Returns uint32 values in int64."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    off = offsets.to(torch.int64)
    c0, c1 = off & M32, (off >> 32) & M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & M32, seed >> 32
    for _ in range(rounds):
        hi_b, lo_b = _mulhi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mulhi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & M32, (k1 + _KEY_B) & M32
    return c0


def round_with_bits(y: torch.Tensor, fmt: str | Format, bits: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding of FP32 `y` onto `fmt`'s grid (saturating) with one 32-bit random
    word per element (uint32 values in an int64 tensor of y's shape); see the module docstring."""
    fmt = get_format(fmt)
    y = y.to(torch.float32)
    bits = bits.to(torch.int64)
    a = y.abs()
    u24 = (bits >> 8).to(torch.float32) * 2.0**-24  # exact: 24-bit integers
    if fmt.is_int:
        q = _floor_bernoulli(a, 1.0, u24)
    else:
        k = 23 - fmt.mbits
        b = y.view(torch.int32).to(torch.int64)
        r = ((b + (bits & ((1 << k) - 1))) & ~((1 << k) - 1) & M32).to(torch.int32)
        q = r.view(torch.float32).abs()
        small = ~(a >= fmt.min_normal)  # also NaN: implementation A keeps it NaN
        quantum = 2.0 ** (fmt.emin - fmt.mbits)
        q = torch.where(small, _floor_bernoulli(a, quantum, u24), q)
    q = torch.where(q > fmt.max_finite, torch.full_like(q, fmt.max_finite), q)
    return torch.copysign(q, y)


def _floor_bernoulli(a: torch.Tensor, quantum: float, u24: torch.Tensor) -> torch.Tensor:
    t = a / quantum  # exact: a power of two
    t0 = torch.floor(t)
    return (t0 + (u24 < t - t0).to(t.dtype)) * quantum


def fake_quantize_with_bits(
    x: torch.Tensor,
    spec: QuantSpec,
    bits: torch.Tensor | None,
    *,
    signs: torch.Tensor | None = None,
) -> torch.Tensor:
    """lptrain.numerics.fake_quantize of a 2-D operand (rows, reduction) along its last axis,
    stateless, with stochastic rounding fed `bits` (uint32 words, one per element of x in
    row-major order; None for round-to-nearest). Scales, rotation and grouping are the
    reference's own functions, so only the rounding step differs from fake_quantize."""
    from lptrain.numerics.quantize import _dequant, _group, _nonfinite
    from lptrain.numerics.scaling import spec_scales

    if spec.scaling in ("delayed",) or spec.amax_refresh > 1:
        raise ValueError("fake_quantize_with_bits is stateless: use scaling without state")
    xt = x.to(torch.float32)
    if spec.hadamard is not None:
        xt = hadamard(xt, spec.hadamard, dim=-1, signs=signs)
    xg = _group(xt, spec.replace(axis=-1), x.shape)
    if spec.scaling == "none" or xg.numel() == 0:
        dec = gdec = None
        y = xg
        bad = None if bool(torch.isfinite(xg).all()) else ~torch.isfinite(xg)
    else:
        sc = spec_scales(xg, spec, None, False, x.dtype)
        dec, gdec, bad, y = sc.dec, sc.gdec, sc.bad, xg * sc.enc
    if spec.rounding == "nearest" or bits is None:
        q = round_to_format(y, spec.fmt, "nearest", "saturate")
    else:
        q = round_with_bits(y, spec.fmt, bits.reshape(y.shape))
    if bad is not None:
        q, dec = _nonfinite(xg, y, q, dec, bad, spec.fmt)
    return _dequant(q, dec, gdec).reshape(x.shape)
