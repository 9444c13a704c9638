"""Bit codes (numerics/codes.py): decode tables against ml_dtypes, encode round trips, FP4
packing, the bit packer of integer codes (every width, odd lengths, its byte layout)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from lptrain.numerics import (
    decode,
    decode_table,
    encode,
    get_format,
    pack_bits,
    pack_nibbles,
    packed_bytes,
    round_to_format,
    unpack_bits,
)

from .conftest import ML_DTYPES, assert_bits_equal

SMALL_FORMATS = [
    "fp8_e4m3",
    "fp8_e5m2",
    "fp6_e3m2",
    "fp6_e2m3",
    "fp4_e2m1",
    "e8m0",
    "ue4m3",
    "ue5m3",
    "e3m4",
    "e4m3",
    "e2m1",
    "int4",
    "int8",
]


@pytest.mark.parametrize("name", [n for n in ML_DTYPES])
def test_decode_table_matches_ml_dtypes(name):
    n = get_format(name).bits
    want = np.arange(1 << n, dtype=np.uint8).view(ML_DTYPES[name]).astype(np.float32)
    assert_bits_equal(decode_table(name), want)


def test_e8m0_decode_matches_ml_dtypes():
    want = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    assert_bits_equal(decode_table("e8m0"), want)


@pytest.mark.parametrize("name", SMALL_FORMATS)
def test_every_code_decodes_and_reencodes_to_itself(name):
    fmt = get_format(name)
    codes = torch.arange(1 << fmt.bits)
    if fmt.is_int:  # two's complement codes as signed ints
        vals = torch.where(codes >= 1 << fmt.mbits, codes - (1 << fmt.bits), codes).float()
        vals = vals[vals.abs() <= fmt.max_finite]
        assert torch.equal(encode(vals, fmt), vals.long())
        assert torch.equal(round_to_format(vals, fmt), vals)
        return
    vals = decode(codes, fmt)
    finite = torch.isfinite(vals)
    back = encode(vals, fmt)
    assert torch.equal(back[finite], codes[finite]), name
    # Inf codes re-encode to themselves; NaN codes to a NaN code.
    inf = torch.isinf(vals)
    assert torch.equal(back[inf], codes[inf])
    assert torch.isnan(decode(back[torch.isnan(vals)], fmt)).all()
    # Every finite value is a fixed point of round_to_format (both overflow modes).
    for ov in ("saturate", "ieee"):
        assert_bits_equal(round_to_format(vals[finite], fmt, overflow=ov), vals[finite])
        assert_bits_equal(
            round_to_format(vals[finite].double(), fmt, overflow=ov), vals[finite].double()
        )


def test_fp8_codes_equal_torch_float8_bits():
    for name, dt in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        codes = torch.arange(256, dtype=torch.uint8)
        assert_bits_equal(decode(codes, name), codes.view(dt).float())


@pytest.mark.parametrize("width", range(1, 9))
def test_pack_bits_is_exactly_inverted_for_every_width_and_odd_length(width):
    gen = torch.Generator().manual_seed(width)
    for n in (1, 3, 7, 8, 9, 31, 65):
        codes = torch.randint(0, 2**width, (3, n), generator=gen).to(torch.uint8)
        codes[0, 0], codes[-1, -1] = 0, 2**width - 1  # both ends of the grid
        packed = pack_bits(codes, width)
        assert packed.dtype == torch.uint8 and packed.shape == (3, (n * width + 7) // 8)
        assert packed.shape[-1] == packed_bytes(n, width)
        assert torch.equal(unpack_bits(packed, width, n), codes), (width, n)
        assert torch.equal(unpack_bits(packed[1:2], width, n), codes[1:2])  # rows slice


def test_pack_bits_layout_is_little_endian():
    # 3 bits: codes 1, 2, 5 at bit offsets 0, 3, 6: 1 + (2 << 3) + (5 << 6) = 337 = 81 + 256.
    assert pack_bits(torch.tensor([1, 2, 5], dtype=torch.uint8), 3).tolist() == [81, 1]
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [57]
    six = torch.tensor([63, 0, 1, 32], dtype=torch.uint8)  # four 6-bit codes in three bytes
    assert pack_bits(six, 6).tolist() == [63, 1 << 4, 1 << 7]  # 1 at bit 12, 32 at bit 23
    nib = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    assert torch.equal(pack_bits(nib, 4), pack_nibbles(nib))  # the FP4/int4 layout
    byte = torch.randint(0, 256, (4, 7), dtype=torch.uint8)
    assert torch.equal(pack_bits(byte, 8), byte)
    with pytest.raises(ValueError, match="7 codes of 3 bits take 3 bytes per row, got 2"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 7)
