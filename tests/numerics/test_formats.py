"""Format records (numerics/formats.py): fields, grids, names (algorithms.md §1.1, §2.8)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from lptrain.numerics import (
    QuantSpec,
    decode_table,
    format_names,
    get_format,
    round_to_format,
)

from .conftest import assert_bits_equal


@pytest.mark.parametrize(
    "name,e,m,bias,mx,mn,ms,inf",
    [
        ("fp8_e4m3", 4, 3, 7, 448.0, 2.0**-6, 2.0**-9, False),
        ("fp8_e5m2", 5, 2, 15, 57344.0, 2.0**-14, 2.0**-16, True),
        ("fp6_e3m2", 3, 2, 3, 28.0, 0.25, 0.0625, False),
        ("fp6_e2m3", 2, 3, 1, 7.5, 1.0, 0.125, False),
        ("fp4_e2m1", 2, 1, 1, 6.0, 1.0, 0.5, False),
        ("ue5m3", 5, 3, 15, 61440.0, 2.0**-14, 2.0**-17, False),
        ("ue4m3", 4, 3, 7, 448.0, 2.0**-6, 2.0**-9, False),
        ("e3m4", 3, 4, 3, 15.5, 0.25, 2.0**-6, True),
        ("e4m3", 4, 3, 7, 240.0, 2.0**-6, 2.0**-9, True),
    ],
)
def test_format_records(name, e, m, bias, mx, mn, ms, inf):
    f = get_format(name)
    assert (f.ebits, f.mbits, f.bias, f.max_finite, f.min_normal, f.min_subnormal, f.has_inf) == (
        e,
        m,
        bias,
        mx,
        mn,
        ms,
        inf,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.max_finite = 1.0  # frozen


def test_e8m0_and_int_records():
    f = get_format("e8m0")
    assert (f.max_finite, f.min_normal, f.signed, f.has_zero) == (2.0**127, 2.0**-127, False, False)
    assert get_format("int16").max_finite == 32767.0
    assert get_format("int8").max_finite == 127.0
    assert get_format("int4").max_finite == 7.0
    assert get_format(" FP8_E4M3 ") is get_format("fp8_e4m3")
    assert get_format(get_format("fp4_e2m1")).name == "fp4_e2m1"


def _pos_grid(name):
    t = decode_table(name).numpy()
    return sorted({float(v) for v in t if np.isfinite(v) and v >= 0})


def test_reference_grids():
    assert _pos_grid("fp4_e2m1") == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    e2m3 = (
        [i * 0.125 for i in range(16)]
        + [1 + i * 0.125 for i in range(8)]
        + [2 + i * 0.25 for i in range(8)]
        + [4 + i * 0.5 for i in range(8)]
    )
    assert _pos_grid("fp6_e2m3") == sorted(set(e2m3)) and len(set(e2m3)) == 32
    assert _pos_grid("fp6_e3m2") == [
        0,
        0.0625,
        0.125,
        0.1875,
        0.25,
        0.3125,
        0.375,
        0.4375,
        0.5,
        0.625,
        0.75,
        0.875,
        1,
        1.25,
        1.5,
        1.75,
        2,
        2.5,
        3,
        3.5,
        4,
        5,
        6,
        7,
        8,
        10,
        12,
        14,
        16,
        20,
        24,
        28,
    ]
    e4m3 = decode_table("fp8_e4m3").numpy()
    pos = [float(v) for v in e4m3[:128] if np.isfinite(v)]
    assert len(pos) == 127 and pos[-3:] == [384.0, 416.0, 448.0]
    assert int(np.isfinite(e4m3).sum()) == 254
    assert len({float(v) for v in e4m3 if np.isfinite(v)}) == 253
    assert np.isnan(e4m3[0x7F]) and np.isnan(e4m3[0xFF])
    e5m2 = decode_table("fp8_e5m2").numpy()
    assert int(np.isfinite(e5m2).sum()) == 248
    assert int(np.isinf(e5m2).sum()) == 2 and int(np.isnan(e5m2).sum()) == 6
    ue5 = decode_table("ue5m3").numpy()
    fin = ue5[np.isfinite(ue5)]
    assert fin.max() == 61440.0 and fin[fin > 0].min() == 2.0**-17
    assert np.isnan(ue5[255])
    e8 = decode_table("e8m0").numpy()
    assert e8[0] == 2.0**-127 and e8[127] == 1.0 and e8[254] == 2.0**127 and np.isnan(e8[255])


@pytest.mark.parametrize(
    "x,want",
    [
        (1.0625, 1.0),
        (1.1875, 1.25),
        (2.0**-18, 0.0),
        (1.5 * 2.0**-18, 2.0**-17),
        (70000.0, 61440.0),
        (61440.0, 61440.0),
        (2.0**-17, 2.0**-17),
        (0.0, 0.0),
    ],
)
def test_ue5m3_reference_values(x, want):
    got = round_to_format(torch.tensor([x], dtype=torch.float32), "ue5m3")
    assert got.item() == want


def test_eXmY_strings_are_ieee_like():
    f = get_format("e3m4")
    assert f.bias == 3 and f.has_inf and f.nan == "ieee"
    f = get_format("e2m1")  # IEEE-like: all-ones exponent reserved, unlike fp4_e2m1
    assert f.max_finite == 3.0
    assert (
        math.isinf(round_to_format(torch.tensor([4.0]), "e5m10", overflow="ieee").item()) is False
    )
    assert round_to_format(torch.tensor([65520.0]), "e5m10", overflow="ieee").item() == math.inf
    # e5m10 is IEEE half: identical to torch's float16 cast on random values.
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 1000
    assert_bits_equal(round_to_format(x, "e5m10", overflow="ieee"), x.half().float())


def test_unknown_format_lists_known_ones():
    with pytest.raises(ValueError) as e:
        get_format("fp7_e3m3")
    msg = str(e.value)
    assert "fp7_e3m3" in msg
    for name in format_names():
        assert name in msg
    assert "eXmY" in msg
    with pytest.raises(ValueError, match="known formats"):
        round_to_format(torch.ones(2), "bf17")
    with pytest.raises(ValueError, match="format"):
        QuantSpec("nope")
    with pytest.raises(ValueError, match="eXmY"):
        get_format("e9m2")
