"""Bit codes (numerics/codes.py): decode tables against ml_dtypes, encode round trips, FP4
packing."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from lptrain.numerics import decode, decode_table, encode, get_format, round_to_format

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
