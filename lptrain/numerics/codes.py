"""Bit codes of the formats: decode tables, encode of on-grid values, bit packing.

Codes are the format's own bit patterns (sign | exponent | mantissa), so an FP8 code tensor
viewed as `torch.float8_e4m3fn` is the same number, and 4-bit codes pack two per byte (element
2i in the low nibble, 2i+1 in the high nibble, as the OCP MX and NVFP4 layouts do).
`pack_bits` is the same little-endian layout for any width 1..8 (integer exports).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from lptrain.numerics.formats import Format, get_format


def _decode_one(code: int, fmt: Format) -> float:
    if fmt.is_int:
        half = 1 << fmt.mbits
        return float(code - 2 * half if code >= half else code)
    m_mask = (1 << fmt.mbits) - 1
    e_all = (1 << fmt.ebits) - 1
    sign = -1.0 if fmt.signed and (code >> (fmt.ebits + fmt.mbits)) & 1 else 1.0
    e = (code >> fmt.mbits) & e_all
    m = code & m_mask
    if fmt.nan == "fn" and e == e_all and m == m_mask:
        return math.nan
    if fmt.nan == "ieee" and e == e_all:
        return sign * math.inf if (m == 0 and fmt.has_inf) else math.nan
    if e == 0 and fmt.subnormals:
        return sign * math.ldexp(m, fmt.emin - fmt.mbits)
    return sign * math.ldexp(1.0 + m / (1 << fmt.mbits), e - fmt.bias)


@lru_cache(maxsize=None)
def _table(fmt: Format) -> torch.Tensor:
    return torch.tensor([_decode_one(c, fmt) for c in range(1 << fmt.bits)], dtype=torch.float32)


def decode_table(fmt: str | Format) -> torch.Tensor:
    """Value of every code 0 .. 2^bits - 1 as float32 (formats of at most 8 bits)."""
    fmt = get_format(fmt)
    if fmt.bits > 8:
        raise ValueError(
            f"decode tables are for formats of at most 8 bits, {fmt.name} has {fmt.bits}"
        )
    return _table(fmt)


def decode(codes: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """float32 values of unsigned code tensors (uint8 / int16 for integer formats)."""
    fmt = get_format(fmt)
    if fmt.is_int:
        return codes.to(torch.float32)
    return decode_table(fmt).to(codes.device)[codes.long() & ((1 << fmt.bits) - 1)]


def encode(values: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """Codes (int64) of values already on the grid of `fmt` (the output of round_to_format).

    NaN maps to the format's canonical NaN code; values off the grid are truncated, so round
    first.
    """
    fmt = get_format(fmt)
    v = values.to(torch.float64)
    if fmt.is_int:
        return v.to(torch.int64)
    sign = torch.signbit(v).long() if fmt.signed else torch.zeros_like(v, dtype=torch.int64)
    a = v.abs()
    _, e2 = torch.frexp(a)
    E = e2.long() - 1
    normal = a >= fmt.min_normal
    biased = torch.where(normal, E + fmt.bias, torch.zeros_like(E))
    q = torch.ldexp(torch.ones_like(a), torch.where(normal, E, torch.full_like(E, fmt.emin)))
    frac = torch.where(normal, a / q - 1.0, a / q) if fmt.subnormals else a / q - 1.0
    m = torch.floor(frac * (1 << fmt.mbits)).long()
    code = (sign << (fmt.ebits + fmt.mbits)) | (biased << fmt.mbits) | m
    e_all = (1 << fmt.ebits) - 1
    m_mask = (1 << fmt.mbits) - 1
    if fmt.has_inf:
        code = torch.where(
            torch.isinf(a), (sign << (fmt.ebits + fmt.mbits)) | (e_all << fmt.mbits), code
        )
    if fmt.nan != "none":
        nan_code = (e_all << fmt.mbits) | (
            m_mask if fmt.nan == "fn" else 1 << max(fmt.mbits - 1, 0)
        )
        code = torch.where(torch.isnan(v), torch.full_like(code, nan_code), code)
    return code


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes along the last axis, two per byte (low nibble first)."""
    if codes.shape[-1] % 2:
        raise ValueError(
            f"packing 4-bit codes needs an even last axis, got shape {tuple(codes.shape)}"
        )
    c = codes.to(torch.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def packed_bytes(count: int, width: int) -> int:
    """Bytes of `count` codes of `width` bits packed by `pack_bits` (whole bytes per row)."""
    return (count * width + 7) // 8


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Unsigned `width`-bit codes (1..8; uint8, < 2^width) packed along the last axis,
    little-endian: code i occupies bits [i·w, (i+1)·w) of the row's bit stream, whose byte j
    holds bits [8j, 8j+8), lowest bit first. Each row ends on a whole byte (zero bits pad it):
    (..., n) -> (..., ceil(n·w/8)) uint8, so rows slice like the unpacked codes. Width 4 is
    `pack_nibbles`; width 8 the codes themselves. The exact inverse is `unpack_bits`."""
    if not 1 <= width <= 8:
        raise ValueError(f"pack_bits: width must be 1..8, got {width}")
    n = codes.shape[-1]
    if 8 % width == 0:  # 1, 2, 4, 8 bits: whole codes per byte, no 64-bit words (faster)
        k = 8 // width
        c = torch.nn.functional.pad(codes.to(torch.uint8), (0, -n % k)).unflatten(-1, (-1, k))
        shifts = torch.arange(k, device=c.device, dtype=torch.uint8) * width
        return (c << shifts).sum(-1, dtype=torch.uint8)  # disjoint bit fields: the sum is an OR
    # Eight codes are exactly `width` bytes: build each group of eight as one 64-bit integer.
    c = codes.to(torch.int64) & ((1 << width) - 1)
    c = torch.nn.functional.pad(c, (0, -n % 8)).unflatten(-1, (-1, 8))  # (..., G, 8)
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * width
    word = (c << shifts).sum(-1, keepdim=True)  # disjoint bit fields: the sum is an OR
    byte_shifts = torch.arange(width, device=c.device, dtype=torch.int64) * 8
    out = ((word >> byte_shifts) & 0xFF).to(torch.uint8).flatten(-2)  # (..., G·width)
    return out[..., : packed_bytes(n, width)]


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The `count` codes per row that `pack_bits(codes, width)` packed, as uint8."""
    if not 1 <= width <= 8:
        raise ValueError(f"unpack_bits: width must be 1..8, got {width}")
    if packed.shape[-1] != packed_bytes(count, width):
        raise ValueError(
            f"unpack_bits: {count} codes of {width} bits take {packed_bytes(count, width)} "
            f"bytes per row, got {packed.shape[-1]}"
        )
    mask = (1 << width) - 1
    if 8 % width == 0:  # whole codes per byte
        k = 8 // width
        shifts = torch.arange(k, device=packed.device, dtype=torch.uint8) * width
        return ((packed.unsqueeze(-1) >> shifts) & mask).flatten(-2)[..., :count]
    b = packed.to(torch.int64)
    b = torch.nn.functional.pad(b, (0, -b.shape[-1] % width)).unflatten(-1, (-1, width))
    byte_shifts = torch.arange(width, device=b.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1, keepdim=True)  # (..., G, 1): eight codes
    shifts = torch.arange(8, device=b.device, dtype=torch.int64) * width
    codes = ((word >> shifts) & mask).to(torch.uint8).flatten(-2)
    return codes[..., :count]
