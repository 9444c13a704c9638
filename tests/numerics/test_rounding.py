"""round_to_format(nearest) against ml_dtypes bit for bit, and RNE properties (§1.2, §1.4)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lptrain.numerics import (
    QuantSpec,
    decode_table,
    dfp_quantize,
    encode,
    fake_quantize,
    get_format,
    hadamard,
    quantize,
    round_to_format,
)

from .conftest import MAXES, ML_DTYPES, ML_SATURATES, assert_bits_equal, ml_round

NAMES = list(ML_DTYPES)


def _finite_grid(name) -> np.ndarray:
    t = decode_table(name).numpy()
    return np.unique(t[np.isfinite(t)].astype(np.float64))  # sorted, +-0 merged


def _probe_values(name) -> np.ndarray:
    """Exhaustive codes, every midpoint (tie) and its float32 neighbours, the overflow region,
    subnormals, and 10^6 random values spanning the whole range (float32)."""
    fmt = get_format(name)
    g = _finite_grid(name)
    mids = (g[:-1] + g[1:]) / 2  # exact in float64 and in float32 (few significant bits)
    mids32 = mids.astype(np.float32)
    assert np.array_equal(mids32.astype(np.float64), mids)
    mx = fmt.max_finite
    top = mx + (mx - g[-2]) / 2  # the overflow threshold (a tie above max)
    over = np.array([mx, top, 2 * mx, 4 * mx, 1e30, np.float32(3.0e38)])
    over32 = over.astype(np.float32)
    near = [np.nextafter(v, np.float32(np.inf)) for v in np.concatenate([mids32, over32])] + [
        np.nextafter(v, np.float32(0)) for v in np.concatenate([mids32, over32])
    ]
    rng = np.random.default_rng(hash(name) % 2**32)
    sub = rng.uniform(0, fmt.min_normal * 1.25, 20000)
    lo, hi = math.log2(fmt.min_subnormal / 8), math.log2(mx * 1.2)
    rnd = np.exp2(rng.uniform(lo, hi, 10**6))
    pos = np.concatenate(
        [
            g.astype(np.float32),
            mids32,
            np.array(near, np.float32),
            over32,
            sub.astype(np.float32),
            rnd.astype(np.float32),
            np.array(
                [0.0, fmt.min_subnormal / 2, fmt.min_subnormal * 0.75, np.float32(1e-45)],
                np.float32,
            ),
        ]
    )
    return np.concatenate([pos, -pos]).astype(np.float32)


@pytest.fixture(scope="module", params=NAMES)
def probe(request):
    return request.param, _probe_values(request.param)


def test_nearest_equals_ml_dtypes_bit_for_bit(probe):
    name, x = probe
    mx = MAXES[name]
    xt = torch.from_numpy(x)
    # saturate: clamp where ml_dtypes does not saturate (fp8 overflows to NaN/Inf).
    want_sat = ml_round(np.clip(x, -mx, mx), name)
    assert_bits_equal(round_to_format(xt, name, overflow="saturate"), want_sat)
    # ieee: like ml_dtypes' own (non-saturating) fp8 cast; fp4/fp6 have no Inf/NaN -> NaN.
    want_ieee = ml_round(x, name)
    if name in ML_SATURATES:
        want_ieee = np.where(np.abs(x) > np.float32(mx) * 1.0 + 0, want_ieee, want_ieee)
        got = round_to_format(xt, name, overflow="ieee").numpy()
        over = np.isnan(got)
        # NaN exactly where the RNE result exceeds max (>= the overflow tie, §1.2 step 8).
        g = _finite_grid(name)
        top = np.float32(mx + (mx - g[-2]) / 2)
        assert np.array_equal(over, np.abs(x) >= top)
        assert_bits_equal(got[~over], want_ieee[~over])
    else:
        assert_bits_equal(round_to_format(xt, name, overflow="ieee"), want_ieee)
    # float64 and float16/bfloat16 inputs: the same values give the same results.
    assert_bits_equal(round_to_format(xt.double(), name), want_sat.astype(np.float64))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp6_e3m2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_float32_path(name, dtype):
    x = (
        torch.randn(50000, generator=torch.Generator().manual_seed(5))
        * torch.exp2(torch.randint(-12, 12, (50000,), generator=torch.Generator().manual_seed(6)))
    ).to(dtype)
    got = round_to_format(x, name)
    assert got.dtype == dtype
    want = round_to_format(x.float(), name)
    assert torch.equal(got.float(), want)  # results are representable in fp16/bf16? compare
    assert_bits_equal(got.float()[torch.isfinite(want)], want[torch.isfinite(want)])


def test_e8m0_equals_ml_dtypes_in_range():
    # ml_dtypes' e8m0 cast rounds to the nearest power of two (ties up), as our grid RNE does.
    rng = np.random.default_rng(3)
    x = np.exp2(rng.uniform(-120, 120, 100000)).astype(np.float32)
    x = np.concatenate(
        [
            x,
            np.exp2(np.arange(-120, 121)).astype(np.float32) * 1.5,
            np.exp2(np.arange(-120, 121)).astype(np.float32),
        ]
    )
    want = x.astype(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    assert_bits_equal(round_to_format(torch.from_numpy(x), "e8m0"), want)


F32 = torch.float32


@pytest.mark.parametrize(
    "name,x,want",
    [
        ("fp8_e4m3", 464.0, 448.0),
        ("fp8_e4m3", 300.0, 288.0),
        ("fp8_e4m3", 2.0**-10, 0.0),
        ("fp8_e4m3", 1.5 * 2.0**-10, 2.0**-9),
        ("fp8_e5m2", 61439.9, 57344.0),
        ("fp8_e5m2", 1.5 * 2.0**-17, 2.0**-16),
        ("fp4_e2m1", 0.25, 0.0),
        ("fp4_e2m1", 0.75, 1.0),
        ("fp4_e2m1", 1.25, 1.0),
        ("fp4_e2m1", 1.75, 2.0),
        ("fp4_e2m1", 2.5, 2.0),
        ("fp4_e2m1", 3.5, 4.0),
        ("fp4_e2m1", 5.0, 4.0),
        ("fp4_e2m1", 5.01, 6.0),
        ("fp4_e2m1", 0.2500001, 0.5),
        ("fp4_e2m1", 6.9, 6.0),
        ("fp4_e2m1", 7.0, 6.0),
        ("fp6_e2m3", 7.75, 7.5),
        ("fp6_e2m3", 0.0625, 0.0),
        ("fp6_e2m3", 0.1875, 0.25),
        ("fp6_e3m2", 30.0, 28.0),
        ("fp6_e3m2", 0.03125, 0.0),
        ("fp6_e3m2", 0.09375, 0.125),
    ],
)
def test_reference_table(name, x, want):
    got = round_to_format(torch.tensor([x, -x], dtype=F32), name)
    assert got.tolist() == [want, -want]
    assert_bits_equal(got, torch.tensor([want, -want], dtype=F32))  # -0 stays -0


@pytest.mark.parametrize(
    "name,x,ieee",
    [
        ("fp8_e4m3", 464.01, "nan"),
        ("fp8_e5m2", 61440.0, "inf"),
        ("fp8_e5m2", 65504.0, "inf"),
        ("fp4_e2m1", 7.0, "nan"),
        ("fp6_e2m3", 7.75, "nan"),
        ("fp6_e3m2", 30.0, "nan"),
    ],
)
def test_overflow_thresholds(name, x, ieee):
    mx = get_format(name).max_finite
    t = torch.tensor([x, -x], dtype=F32)
    assert round_to_format(t, name, overflow="saturate").tolist() == [mx, -mx]
    got = round_to_format(t, name, overflow="ieee")
    if ieee == "nan":
        assert torch.isnan(got).all()
    else:
        assert got.tolist() == [math.inf, -math.inf]


@pytest.mark.parametrize(
    "name", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "ue4m3", "ue5m3", "e3m4"]
)
def test_specials(name):
    fmt = get_format(name)
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, -1e-30, 1e-30])
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        sat = round_to_format(x.to(dt), name).float()
        ieee = round_to_format(x.to(dt), name, overflow="ieee").float()
        assert math.isnan(sat[0]) and math.isnan(ieee[0])
        if fmt.signed:
            assert_bits_equal(
                sat[1:], torch.tensor([fmt.max_finite, -fmt.max_finite, 0.0, -0.0, -0.0, 0.0])
            )
            if fmt.has_inf:
                assert ieee[1:3].tolist() == [math.inf, -math.inf]
            else:
                assert torch.isnan(ieee[1:3]).all()
            assert_bits_equal(ieee[3:], torch.tensor([0.0, -0.0, -0.0, 0.0]))
        else:  # unsigned scale formats: negatives -> 0 (saturate) or NaN (ieee)
            assert sat[1].item() == fmt.max_finite and sat[2].item() == 0.0
            assert math.isnan(ieee[2])


def test_integer_formats():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.6, 127.5, 300.0, -300.0])
    assert round_to_format(x, "int8").tolist() == [0, 2, 2, -0.0, -2, 127, 127, 127, -127]
    assert round_to_format(x, "int4").tolist() == [0, 2, 2, -0.0, -2, 7, 7, 7, -7]
    y = torch.tensor([32766.5, 32767.4, 40000.0, -40000.0])
    assert round_to_format(y, "int16").tolist() == [32766, 32767, 32767, -32767]


# -- properties: idempotent, monotone, odd, within half a quantum, even at ties ----------------


def _quantum(a: np.ndarray, name: str) -> np.ndarray:
    fmt = get_format(name)
    e = np.frexp(a)[1] - 1
    return np.exp2(np.maximum(e, fmt.emin) - fmt.mbits)


@pytest.mark.parametrize(
    "name", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "ue5m3", "e3m4"]
)
def test_rne_properties(name):
    fmt = get_format(name)
    rng = np.random.default_rng(11)
    a = np.sort(
        np.exp2(rng.uniform(math.log2(fmt.min_subnormal) - 3, math.log2(fmt.max_finite), 200000))
    ).astype(np.float32)
    x = torch.from_numpy(a)
    q = round_to_format(x, name)
    assert torch.equal(round_to_format(q, name), q)  # idempotent
    assert bool((q[1:] >= q[:-1]).all())  # monotone non-decreasing
    if fmt.signed:
        assert_bits_equal(round_to_format(-x, name), -q)  # odd symmetry
    err = np.abs(q.double().numpy() - a.astype(np.float64))
    assert (err <= _quantum(a.astype(np.float64), name) / 2).all()
    # At every exact midpoint the result has an even last mantissa bit.
    g = _finite_grid(name)
    g = g[g >= 0]
    mids = torch.from_numpy(((g[:-1] + g[1:]) / 2).astype(np.float32))
    qm = round_to_format(mids, name)
    codes = encode(qm, name)
    assert bool(((codes & 1) == 0).all())


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_hypothesis_e4m3_matches_ml_dtypes(v):
    x = np.array([v], np.float32)
    want = ml_round(np.clip(x, -448, 448), "fp8_e4m3")
    assert_bits_equal(round_to_format(torch.from_numpy(x), "fp8_e4m3"), want)
    want = ml_round(np.clip(x, -6, 6), "fp4_e2m1")
    assert_bits_equal(round_to_format(torch.from_numpy(x), "fp4_e2m1"), want)


def test_bad_modes():
    with pytest.raises(ValueError, match="rounding"):
        round_to_format(torch.zeros(2), "fp8_e4m3", rounding="up")
    with pytest.raises(ValueError, match="overflow"):
        round_to_format(torch.zeros(2), "fp8_e4m3", overflow="wrap")


@pytest.mark.parametrize(
    "dtype",
    [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.complex64],
)
def test_non_floating_tensors_rejected(dtype):
    x = torch.ones(4, 32).to(dtype)
    for call in (
        lambda: round_to_format(x, "fp8_e4m3"),
        lambda: quantize(x, QuantSpec("fp8_e4m3")),
        lambda: fake_quantize(x, QuantSpec("fp4_e2m1", scaling="none")),
        lambda: hadamard(x, 32),
        lambda: dfp_quantize(x),
    ):
        with pytest.raises(TypeError, match="float"):
            call()
    with pytest.raises(TypeError):
        round_to_format([1.0, 2.0], "fp8_e4m3")


def _adversarial(name) -> torch.Tensor:
    """NaNs of both signs and two payloads, +-Inf, +-0, every grid point and tie with its
    float32 neighbours, the max and past it, the format's subnormals, float32 subnormals."""
    fmt = get_format(name)
    g = torch.from_numpy(_finite_grid(name)).float()
    mids = (g[:-1] + g[1:]) / 2
    near = torch.cat([torch.nextafter(mids, torch.tensor(math.inf)), torch.nextafter(mids, g[:1])])
    nans = torch.tensor([0x7FC00000, 0xFFC00000 - 2**32, 0x7FA00001], dtype=torch.int32)
    edge = [math.inf, fmt.max_finite * 1.01, 3.0e38, fmt.min_subnormal / 2, 1e-40, 1e-45, 0.0]
    pos = torch.cat([g, mids, near, torch.tensor(edge)])
    return torch.cat([pos, -pos, nans.view(torch.float32)])


@pytest.mark.parametrize(
    "name", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "ue4m3", "ue5m3"]
)
def test_nearest_fast_path_equals_the_reference_bit_for_bit(name):
    """`_round_nearest_fp32` (the exponent-field quantum) against the reference
    round_magnitude (frexp quantum) on adversarial inputs, NaN payloads included, also on a
    transposed view and an empty tensor."""
    from lptrain.numerics.rounding import apply_overflow, round_magnitude

    fmt = get_format(name)
    x = _adversarial(name)
    want = apply_overflow(round_magnitude(x.abs(), fmt, "nearest", None), fmt, "saturate")
    want = torch.copysign(want, x)  # -0 stays -0, unsigned formats too (as before)
    if not fmt.signed:
        want = torch.where(x < 0, 0.0, want)
    got = round_to_format(x, name)
    if name == "fp8_e5m2":  # torch's cast: its own NaN payload
        assert torch.isnan(got[x.isnan()]).all()
        got, want = got[~x.isnan()], want[~x.isnan()]
    assert_bits_equal(got, want)
    n = x.numel() // 4 * 4
    xt = x[:n].reshape(4, -1).T
    assert_bits_equal(round_to_format(xt, name), round_to_format(xt.contiguous(), name))
    assert round_to_format(torch.empty(0, 3), name).shape == (0, 3)
