"""Element and scale formats as data (algorithms.md §1.1, §2.6-2.8).

A `Format` is a frozen record; every other module derives what it needs (the grid, the
quantum of a binade, the code table) from these fields. Names:

* `fp8_e4m3` (OCP E4M3FN: no Inf, NaN only at S.1111.111, max 448), `fp8_e5m2` (IEEE-like),
  `fp6_e3m2`, `fp6_e2m3`, `fp4_e2m1` (OCP MX elements: no Inf, no NaN).
* scale formats `e8m0` (OCP MX shared exponent: powers of two 2^-127..2^127, no zero, NaN at
  0xFF), `ue4m3` (the unsigned E4M3FN of NVFP4 block scales), `ue5m3` (Graphcore's UE5M3:
  5 exponent bits, bias 15, subnormals, max 61440 = 1.875 * 2^15 because exponent field 31 is
  reserved for specials; the definition of the authors' published numerical contract, see
  algorithms.md §2.8 for the two competing ones).
* integer formats `int4`, `int8`, `int16`: symmetric grids [-(2^(b-1) - 1), 2^(b-1) - 1] (the
  most negative code is not used, so that negation is exact and scales are symmetric).
* any `eXmY` string (e.g. `e3m4`): an IEEE-like minifloat with subnormals, bias 2^(X-1) - 1,
  exponent field all-ones reserved for Inf/NaN. Note `e4m3` is therefore the IEEE-like E4M3
  (max 240), not `fp8_e4m3`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class Format:
    name: str
    ebits: int  # exponent bits (0 for integers)
    mbits: int  # mantissa (fraction) bits; for integers: magnitude bits
    bias: int
    max_finite: float
    min_normal: float  # smallest positive normal (integers: 1)
    min_subnormal: float  # smallest positive non-zero value
    has_inf: bool
    # NaN policy: "ieee" (all-ones exponent: NaN, or Inf if mantissa 0 and has_inf),
    # "fn" (only the all-ones code), "none"
    nan: str
    signed: bool = True
    subnormals: bool = True
    has_zero: bool = True
    is_int: bool = False

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade; subnormals share its quantum."""
        return 1 - self.bias

    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits

    @property
    def emax(self) -> int:
        """Exponent of the largest finite binade (MX's emax_elem)."""
        if self.is_int:
            return self.mbits - 1
        return _exponent(self.max_finite)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype whose codes equal ours, where one exists."""
        return {
            "fp8_e4m3": torch.float8_e4m3fn,
            "fp8_e5m2": torch.float8_e5m2,
            "int8": torch.int8,
            "int16": torch.int16,
        }.get(self.name)

    def __str__(self) -> str:
        return self.name


def _exponent(v: float) -> int:

    return math.frexp(v)[1] - 1


def _ieee_like(name: str, e: int, m: int) -> Format:
    bias = 2 ** (e - 1) - 1
    top = 2**e - 2 - bias  # all-ones exponent is reserved
    return Format(
        name=name,
        ebits=e,
        mbits=m,
        bias=bias,
        max_finite=(2 - 2.0**-m) * 2.0**top,
        min_normal=2.0 ** (1 - bias),
        min_subnormal=2.0 ** (1 - bias - m),
        has_inf=True,
        nan="ieee",
    )


def _ocp(
    name: str, e: int, m: int, max_finite: float, nan: str = "none", signed: bool = True
) -> Format:
    bias = 2 ** (e - 1) - 1
    return Format(
        name=name,
        ebits=e,
        mbits=m,
        bias=bias,
        max_finite=max_finite,
        min_normal=2.0 ** (1 - bias),
        min_subnormal=2.0 ** (1 - bias - m),
        has_inf=False,
        nan=nan,
        signed=signed,
    )


def _int(name: str, bits: int) -> Format:
    return Format(
        name=name,
        ebits=0,
        mbits=bits - 1,
        bias=0,
        max_finite=float(2 ** (bits - 1) - 1),
        min_normal=1.0,
        min_subnormal=1.0,
        has_inf=False,
        nan="none",
        is_int=True,
    )


_NAMED: dict[str, Format] = {
    "fp8_e4m3": _ocp("fp8_e4m3", 4, 3, 448.0, nan="fn"),
    "fp8_e5m2": _ieee_like("fp8_e5m2", 5, 2),
    "fp6_e3m2": _ocp("fp6_e3m2", 3, 2, 28.0),
    "fp6_e2m3": _ocp("fp6_e2m3", 2, 3, 7.5),
    "fp4_e2m1": _ocp("fp4_e2m1", 2, 1, 6.0),
    "e8m0": Format(
        name="e8m0",
        ebits=8,
        mbits=0,
        bias=127,
        max_finite=2.0**127,
        min_normal=2.0**-127,
        min_subnormal=2.0**-127,
        has_inf=False,
        nan="fn",
        signed=False,
        subnormals=False,
        has_zero=False,
    ),
    "ue4m3": _ocp("ue4m3", 4, 3, 448.0, nan="fn", signed=False),
    "ue5m3": Format(
        name="ue5m3",
        ebits=5,
        mbits=3,
        bias=15,
        max_finite=61440.0,
        # Exponent field 31 is reserved for specials (that is why max is 61440, not 114688):
        # every code 0xF8..0xFF decodes to NaN ("ieee" policy without Inf), so no code decodes
        # above max_finite.
        min_normal=2.0**-14,
        min_subnormal=2.0**-17,
        has_inf=False,
        nan="ieee",
        signed=False,
    ),
    "int4": _int("int4", 4),
    "int8": _int("int8", 8),
    "int16": _int("int16", 16),
}

_EXMY = re.compile(r"^e(\d+)m(\d+)$")


def format_names() -> list[str]:
    return list(_NAMED)


@lru_cache(maxsize=None)
def _parse(name: str) -> Format:
    if name in _NAMED:
        return _NAMED[name]
    match = _EXMY.match(name)
    if match:
        e, m = int(match.group(1)), int(match.group(2))
        if 2 <= e <= 8 and 0 <= m <= 10 and e + m <= 15:
            return _ieee_like(name, e, m)
        raise ValueError(f"format {name!r}: eXmY needs 2 <= X <= 8, 0 <= Y <= 10 and X + Y <= 15")
    known = ", ".join(format_names())
    raise ValueError(f"unknown format {name!r}; known formats: {known}, or any 'eXmY' (e.g. e3m4)")


def get_format(name: str | Format) -> Format:
    """The `Format` record for a name (or the record itself). Unknown names raise ValueError."""
    if isinstance(name, Format):
        return name
    if not isinstance(name, str):
        raise ValueError(f"format must be a name or a Format, got {type(name).__name__}")
    return _parse(name.strip().lower())
