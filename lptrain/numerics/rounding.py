"""Rounding to a format's grid, no scaling (algorithms.md §1.2-1.3).

`round_to_format` is the specification every kernel is tested against. Nearest is
round-to-nearest-even on the exact binade quantum; stochastic is floor + Bernoulli
(implementation A of §1.3): round up with probability (a - lo) / (hi - lo), one uniform per
element drawn from the caller's `torch.Generator`, so runs are reproducible and unbiased.
"""

from __future__ import annotations

import torch

from lptrain.numerics.formats import Format, get_format

ROUNDINGS = ("nearest", "stochastic")
OVERFLOWS = ("saturate", "ieee")


def check_floating(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(
            f"{what} must be a float16/bfloat16/float32/float64 tensor, got {x.dtype}"
        )


def _check_modes(rounding: str, overflow: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """FP32 math for every input of 32 bits or fewer (exact upcast); FP64 stays FP64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def binade_quantum(a: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The grid spacing u = 2^(max(E, emin) - M) of each |x| (E exact, from frexp)."""
    _, e = torch.frexp(a)
    exp = torch.clamp(e - 1, min=fmt.emin) - fmt.mbits
    return torch.ldexp(torch.ones_like(a), exp)


def uniform_like(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(t.shape, generator=generator, device=t.device, dtype=t.dtype)


def round_magnitude(a: torch.Tensor, fmt: Format, rounding: str,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Round non-negative magnitudes onto the (unbounded above) grid of `fmt`."""
    u = torch.ones_like(a) if fmt.is_int else binade_quantum(a, fmt)
    t = a / u  # exact: u is a power of two
    if rounding == "nearest":
        return torch.round(t) * u
    t0 = torch.floor(t)
    up = uniform_like(t, generator) < (t - t0)
    return (t0 + up) * u


def apply_overflow(r: torch.Tensor, fmt: Format, overflow: str) -> torch.Tensor:
    """Bound rounded magnitudes r (NaN propagates) to the format's finite range."""
    if not fmt.has_zero:  # E8M0: no zero, the smallest scale is 2^-127
        r = torch.clamp(r, min=fmt.min_normal)
    too_big = r > fmt.max_finite
    if overflow == "saturate" or fmt.is_int:
        return torch.where(too_big, torch.full_like(r, fmt.max_finite), r)
    special = float("inf") if fmt.has_inf else float("nan")
    return torch.where(too_big, torch.full_like(r, special), r)


def overflow_threshold(fmt: Format) -> tuple[float, bool]:
    """(t, inclusive): RNE overflows iff |x| > t (or >= t when inclusive), §1.2 step 8.

    t is the midpoint between max_finite and the next binade step; the tie goes to the even
    neighbour, i.e. up (overflow) exactly when max_finite has an odd last mantissa bit.
    """
    top_quantum = 2.0 ** (fmt.emax - fmt.mbits)
    return fmt.max_finite + top_quantum / 2, int(fmt.max_finite / top_quantum) % 2 == 1


def _fp8_cast(x: torch.Tensor, fmt: Format, overflow: str) -> torch.Tensor:
    # torch's casts are RNE, but whether they saturate differs between versions and dtypes
    # (torch 2.13's float8_e4m3fn cast saturates, Inf included; its e5m2 cast overflows to
    # Inf). Never rely on it: clamp first (TE's reference does the same, §1.2) and, for
    # overflow="ieee", write the overflow value back where RNE exceeds max_finite.
    y = torch.clamp(x, -fmt.max_finite, fmt.max_finite).to(fmt.torch_dtype).to(x.dtype)
    if overflow == "saturate":
        return y
    t, inclusive = overflow_threshold(fmt)
    a = x.abs()
    over = a >= t if inclusive else a > t
    if fmt.has_inf:
        special = torch.copysign(torch.full_like(y, float("inf")), x)
    else:
        special = torch.full_like(y, float("nan"))
    return torch.where(over, special, y)


def round_to_format(x: torch.Tensor, fmt: str | Format, rounding: str = "nearest",
                    overflow: str = "saturate",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Each element of `x` to the nearest (or a stochastic neighbouring) value of `fmt`.

    Same shape and dtype as `x`; no scaling. NaN stays NaN, signed zeros are kept, subnormals
    are exact. `overflow="saturate"` clamps to +-max finite (Inf too); `"ieee"` gives Inf where
    the format has one, else NaN, like torch's own casts. Integer formats always saturate.
    Unsigned formats map negative inputs to 0 (saturate) or NaN (ieee).
    """
    fmt = get_format(fmt)
    check_floating(x)
    _check_modes(rounding, overflow)
    if rounding == "nearest" and fmt.name in ("fp8_e4m3", "fp8_e5m2") and x.dtype != torch.float64:
        return _fp8_cast(x, fmt, overflow)
    w = x.to(work_dtype(x))
    r = apply_overflow(round_magnitude(w.abs(), fmt, rounding, generator), fmt, overflow)
    if fmt.signed:
        r = torch.copysign(r, w)
    else:
        neg = w < 0  # NaN (whatever its sign bit) stays NaN; -0 becomes +0
        r = torch.where(neg, torch.full_like(r, 0.0 if overflow == "saturate" else float("nan")), r)
    return r.to(x.dtype)
