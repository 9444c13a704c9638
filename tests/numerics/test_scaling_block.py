"""MX (OCP floor / ceil), NVFP4 and UE5M3 two-level block scaling (algorithms.md §2.6-2.8)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lptrain import recipes
from lptrain.numerics import QuantSpec, ScalingState, fake_quantize, quantize, round_to_format

from .conftest import MAXES, assert_bits_equal, ml_round

EMAX = {"fp8_e4m3": 8, "fp8_e5m2": 15, "fp6_e3m2": 4, "fp6_e2m3": 2, "fp4_e2m1": 2}


def mx(fmt, rounding="floor", bs=32, **kw):
    return QuantSpec(
        fmt, scaling="block", block_size=bs, scale_format="e8m0", scale_rounding=rounding, **kw
    )


def _pad(v, n=32):
    return torch.tensor(list(v) + [0.0] * (n - len(v)), dtype=torch.float32)


@pytest.mark.parametrize(
    "rounding,X,P",
    [
        ("floor", 0.5, [0.0, -0.5, 2.0, 6.0]),
        ("ceil", 1.0, [0.0, -0.0, 1.0, 4.0]),
    ],
)
def test_mx_e2m1_worked_example(rounding, X, P):
    x = _pad([0.1, -0.25, 1.0, 3.7])
    qt = quantize(x, mx("fp4_e2m1", rounding))
    assert qt.scales.reshape(-1).tolist() == [X]
    assert_bits_equal(qt.values().reshape(-1)[:4], torch.tensor(P))
    assert_bits_equal(qt.dequantize()[:4], torch.tensor(P) * X)
    assert_bits_equal(fake_quantize(x, mx("fp4_e2m1", rounding)), qt.dequantize())


def test_mx_e4m3_worked_example():
    x = _pad([300.0, 1.0, -0.01, 511.0])
    qt = quantize(x, mx("fp8_e4m3"))
    assert qt.scales.reshape(-1).tolist() == [1.0]
    assert qt.codes.dtype == torch.float8_e4m3fn
    assert_bits_equal(qt.dequantize()[:4], torch.tensor([288.0, 1.0, -0.009765625, 448.0]))
    # ceil: 2^ceil(log2(511/448)) = 2
    assert quantize(x, mx("fp8_e4m3", "ceil")).scales.reshape(-1).tolist() == [2.0]


def _mx_reference(x: np.ndarray, fmt: str, rounding: str, bs: int = 32) -> np.ndarray:
    """Independent OCP MX reference: math.frexp exponents, ml_dtypes element rounding."""
    out = np.empty_like(x)
    for b in range(0, x.size, bs):
        v = x[b : b + bs].astype(np.float32)
        a = float(np.max(np.abs(v)))
        if not math.isfinite(a):
            out[b : b + bs] = np.nan
            continue
        if a == 0:
            e = -127
        elif rounding == "floor":
            e = math.frexp(a)[1] - 1 - EMAX[fmt]
        else:
            r = float(np.float32(a) / np.float32(MAXES[fmt]))  # FP32 division, then ceil(log2)
            m, k = math.frexp(r)
            e = k - 1 if m == 0.5 else k
        e = max(e, -127)
        if e > 127:
            out[b : b + bs] = np.nan
            continue
        X = 2.0**e
        y = (v.astype(np.float64) / X).astype(np.float32)  # exact (power of two)
        p = ml_round(np.clip(y, -MAXES[fmt], MAXES[fmt]), fmt)
        out[b : b + bs] = (p.astype(np.float64) * X).astype(np.float32)
    return out


@pytest.mark.parametrize("fmt", list(EMAX))
@pytest.mark.parametrize("rounding", ["floor", "ceil"])
def test_mx_equals_reference_rule(fmt, rounding):
    rng = np.random.default_rng(hash((fmt, rounding)) % 2**32)
    nb = 256
    x = (rng.standard_normal((nb, 32)) * np.exp2(rng.integers(-30, 30, (nb, 1)))).astype(np.float32)
    x[0] = 0.0
    x[1, :] = 0.0
    x[1, 5] = 2.0**-140  # below the E8M0 range: exponent clamps to -127
    x[2] = 2.0 ** np.arange(-16, 16)  # exact powers of two
    x = x.reshape(-1)
    got = fake_quantize(torch.from_numpy(x), mx(fmt, rounding))
    assert_bits_equal(got, _mx_reference(x, fmt, rounding))


def test_mx_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) * torch.exp2(torch.randint(-10, 10, (64, 1), generator=g))
    spec = mx("fp4_e2m1")
    qt = quantize(x, spec)
    s = qt.scales
    m, _ = torch.frexp(s)
    assert bool((m == 0.5).all())  # exact powers of two
    y = qt.dequantize()
    assert bool((y.reshape(64, 4, 32).abs() <= 6 * s).all())
    # blocks are independent: perturb one block, every other block is unchanged
    x2 = x.clone()
    x2[5, 32:64] *= 1000
    y2 = fake_quantize(x2, spec)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[5, 32:64] = False
    assert torch.equal(y2[mask], y[mask]) and not torch.equal(y2[~mask], y[~mask])
    # zero block -> exact zeros; NaN or Inf in a block -> the whole block NaN, others untouched
    x3 = x.clone()
    x3[0, :32] = 0.0
    x3[1, 40] = math.nan
    x3[2, 100] = math.inf
    y3 = fake_quantize(x3, spec)
    assert torch.equal(y3[0, :32], torch.zeros(32))
    assert bool(torch.isnan(y3[1, 32:64]).all()) and bool(torch.isnan(y3[2, 96:128]).all())
    assert bool(torch.isfinite(y3[1, :32]).all()) and torch.equal(y3[3:], y[3:])
    qt3 = quantize(x3, spec)
    assert qt3.scales.reshape(64, 4)[0, 0].item() == 2.0**-127
    assert math.isnan(qt3.scales.reshape(64, 4)[1, 1].item())
    # quantizing along K vs along T differs (transposes must be re-quantized)
    yt = fake_quantize(x, mx("fp4_e2m1", axis=0))
    assert not torch.equal(yt, y)
    assert_bits_equal(yt, fake_quantize(x.T.contiguous(), spec).T)


# -- NVFP4 (§2.7) -------------------------------------------------------------------------------

NVFP4 = QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3")
F = np.float32


def test_nvfp4_worked_example():
    x = torch.zeros(2, 16)
    x[0, :4] = torch.tensor([0.5, -1.0, 2.0, 12.0])
    x[1] = 0.001
    qt = quantize(x, NVFP4)
    s_enc = F(2688.0) / F(12.0)
    assert s_enc == 224.0 and qt.global_scale.item() == F(1.0) / s_enc
    assert qt.scales.reshape(-1).tolist() == [448.0, 0.0390625]
    u = F(0.001) * (F(224.0) * F(1.0 / 6.0))
    assert abs(float(u) - 0.0373333) < 1e-6
    assert qt.codes.dtype == torch.uint8 and qt.codes.shape == (2, 1, 8)  # packed
    v = qt.values().reshape(2, 16)
    assert_bits_equal(v[0, :4], torch.tensor([0.0, -0.5, 1.0, 6.0]))
    assert bool((v[1] == 6.0).all())
    y = qt.dequantize()
    sdec = F(1.0) / F(224.0)
    # x_hat = (q . s_b) . S_dec in FP32: 12 becomes 12.000001 because 1/224 is inexact
    want0 = [float((F(q) * F(448.0)) * sdec) for q in (0.0, -0.5, 1.0, 6.0)]
    assert want0[3] == float(np.nextafter(F(12.0), F(13.0)))
    assert_bits_equal(y[0], torch.tensor(want0 + [0.0] * 12))
    assert torch.allclose(y[0, :4], torch.tensor([0.0, -1.0, 2.0, 12.0]), rtol=2**-22, atol=0)
    want1 = (F(6.0) * F(0.0390625)) * sdec
    assert_bits_equal(y[1], torch.full((16,), float(want1)))
    assert abs(float(want1) - 0.00104632) < 5e-9
    enc1 = min(F(1.0) / (F(0.0390625) * sdec), F(3.4028235e38))
    assert abs(float(enc1) - 5734.4) < 1e-3
    assert_bits_equal(fake_quantize(x, NVFP4), y)


def _nvfp4_reference(x: np.ndarray, rows_tile=None) -> np.ndarray:
    """Independent NVFP4 reference (TE reference_nvfp4 order of FP32 operations)."""
    x = x.astype(np.float32)
    g = F(np.max(np.abs(x)))
    s_enc = F(F(2688.0) / g) if g > 0 else F(1.0)
    s_enc = min(s_enc, F(np.finfo(np.float32).max))
    s_dec = F(1.0) / s_enc
    out = np.empty_like(x)
    r, c = rows_tile or (1, 16)
    for i in range(0, x.shape[0], r):
        for j in range(0, x.shape[1], c):
            blk = x[i : i + r, j : j + c]
            a = F(np.max(np.abs(blk)))
            s_b = ml_round(np.array([min(a * (s_enc * F(1.0 / 6.0)), F(448.0))], F), "fp8_e4m3")[0]
            enc = F(1.0) / (s_b * s_dec) if s_b > 0 else F(np.inf)
            enc = min(enc, F(np.finfo(np.float32).max))
            q = ml_round(np.clip((blk * enc).astype(F), -6, 6), "fp4_e2m1")
            out[i : i + r, j : j + c] = (q * s_b) * s_dec
    return out


def test_nvfp4_equals_reference_and_error_bound():
    rng = np.random.default_rng(1)
    x = (
        rng.standard_normal((32, 64)) * np.exp2(rng.integers(-8, 8, (32, 4)).repeat(16, 1))
    ).astype(np.float32)
    x[3] = 0.0
    got = fake_quantize(torch.from_numpy(x), NVFP4)
    want = _nvfp4_reference(x)
    assert_bits_equal(got, want)
    # every element within half its E2M1 quantum x s_b . S_dec, except clamped block maxima
    qt = quantize(torch.from_numpy(x), NVFP4)
    scale = (qt.scales * qt.global_scale).double().reshape(32, 4, 1)
    y = torch.from_numpy(x).double().reshape(32, 4, 16) / scale
    q = qt.values().double().reshape(32, 4, 16)
    quantum = torch.where(y.abs() < 2, 0.5, torch.where(y.abs() < 4, 1.0, 2.0))
    ok = ((q - y).abs() <= quantum / 2 + 1e-5) | (y.abs() > 6) | (scale == 0)  # zero blocks
    assert bool(ok.all())


def test_nvfp4_2d_tiles_same_scales_for_both_views():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 48)) * np.exp2(rng.integers(-6, 6, (64, 1)))).astype(np.float32)
    spec = NVFP4.replace(block_size=(16, 16))
    wt = torch.from_numpy(w)
    a, b = quantize(wt, spec), quantize(wt.T.contiguous(), spec)
    sa = a.scales.reshape(4, 3)
    sb = b.scales.reshape(3, 4)
    assert torch.equal(sa, sb.T)
    assert_bits_equal(a.dequantize(), b.dequantize().T)
    assert_bits_equal(a.dequantize(), _nvfp4_reference(w, (16, 16)))


def test_nvfp4_zero_tensor():
    qt = quantize(torch.zeros(4, 32), NVFP4)
    assert qt.global_scale.item() == 1.0
    assert torch.equal(qt.dequantize(), torch.zeros(4, 32))


# -- UE5M3 (§2.8) -------------------------------------------------------------------------------

UE5 = QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue5m3")


def test_ue5m3_worked_example():
    x = torch.zeros(3, 16)
    x[0, 0] = 10.0  # tensor reference g = 10
    x[1, :3] = torch.tensor([0.37, -0.1, 0.2])
    qt = quantize(x, UE5)
    g_enc = F(F(448.0 * 6.0) / F(10.0))
    assert abs(float(g_enc) - 268.8) < 1e-4 and qt.global_scale.item() == F(1.0) / g_enc
    u = F(0.37) * (g_enc * F(1.0 / 6.0))
    assert abs(float(u) - 16.576) < 1e-4
    s = qt.scales.reshape(-1).tolist()
    assert s[1] == 16.0 and s[2] == 1.0  # zero block: guard scale 1
    assert s[0] == 448.0  # the reference block lands exactly on T
    y = qt.dequantize()
    want = (F(6.0) * F(16.0)) * (F(1.0) / g_enc)
    assert y[1, 0].item() == want and abs(float(want) - 0.357143) < 1e-6
    assert torch.equal(y[2], torch.zeros(16))
    assert y[0, 0].item() == (F(6.0) * F(448.0)) * (F(1.0) / g_enc)  # 10.000001 in FP32


def test_ue5m3_refresh_schedule():
    spec = UE5.replace(amax_refresh=50)
    st = ScalingState(history_len=1)
    refs = []
    for t in range(1, 121):
        x = torch.zeros(2, 16)
        x[0, 0] = float(t)  # amax = step number
        qt = quantize(x, spec, state=st)
        refs.append(st.ref.item())
        assert qt.global_scale.item() == F(1.0) / F(F(2688.0) / F(st.ref.item()))
    changes = [t for t in range(1, 121) if t == 1 or refs[t - 1] != refs[t - 2]]
    assert changes == [1, 51, 101]
    assert refs[0] == 1.0 and refs[50] == 51.0 and refs[100] == 101.0 and refs[119] == 101.0
    # a second operand has its own cache
    st2 = ScalingState(history_len=1)
    quantize(torch.full((1, 16), 7.0), spec, state=st2)
    assert st2.ref.item() == 7.0 and st.ref.item() == 101.0


def test_ue5m3_headroom():
    # stale reference g = 1, then blocks of max rho: no block scale saturates iff 448 rho <= 61440
    spec = UE5.replace(amax_refresh=1000)
    st = ScalingState(history_len=1)
    quantize(torch.ones(1, 16), spec, state=st)
    for rho, sat in ((137.0, False), (138.0, True)):
        x = torch.full((1, 16), rho)
        qt = quantize(x, spec, state=st)
        assert qt.scales.max().item() == 61440.0  # 61376 rounds up to max; 61824 clamps
        assert (qt.dequantize().max().item() < rho * 0.999) == sat


def test_nan_only_blocks_documented_results():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x[1, :32] = math.nan
    # MX (OCP): a NaN block has a NaN scale and decodes to NaN; other blocks are untouched.
    mx = QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="e8m0")
    y = fake_quantize(x, mx)
    clean = fake_quantize(torch.nan_to_num(x, nan=0.0), mx)
    assert bool(torch.isnan(y[1, :32]).all())
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[1, :32] = False
    assert torch.equal(y[keep], clean[keep])
    # FP32 block scales: amax NaN -> enc 1 (TE "no action possible"): NaNs propagate only there
    fb = QuantSpec("fp8_e4m3", scaling="block", block_size=32)
    y = fake_quantize(x, fb)
    assert bool(torch.isnan(y[1, :32]).all()) and bool(torch.isfinite(y[keep]).all())
    assert torch.equal(y[keep], fake_quantize(torch.nan_to_num(x, nan=0.0), fb)[keep])
    # NVFP4: the NaN block is NaN; the tensor amax is NaN -> S_enc = 1; other blocks finite
    nv = QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3")
    qt = quantize(x, nv)
    assert qt.global_scale.item() == 1.0
    y = qt.dequantize()
    assert bool(torch.isnan(y[1, :32]).all()) and bool(torch.isfinite(y[keep]).all())
    # per-tensor: enc 1, NaN stays NaN
    y = fake_quantize(x, QuantSpec("fp8_e4m3"))
    assert bool(torch.isnan(y[1, :32]).all())
    # element rounding: NaN stays NaN for every format and mode
    for name in ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp4_e2m1", "ue5m3", "e3m4", "int8"):
        for mode in ("nearest", "stochastic"):
            assert math.isnan(round_to_format(torch.tensor([math.nan]), name, mode).item())


@pytest.mark.parametrize("sfmt", ["ue4m3", "ue5m3"])
def test_two_level_ceil_scales_never_clip(sfmt: str):
    """scale_rounding='ceil' rounds each block scale up: no element saturates, while RNE (TE)
    clips block maxima whenever the scale rounds down."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.rand(256, 1, generator=g) * 10
    kw = dict(scaling="block", block_size=16, scale_format=sfmt)
    rne = fake_quantize(x, QuantSpec("fp4_e2m1", **kw), with_stats=True)[1]["stats"]
    ceil = fake_quantize(x, QuantSpec("fp4_e2m1", scale_rounding="ceil", **kw), with_stats=True)
    assert float(rne.saturated) > 0.005
    assert float(ceil[1]["stats"].saturated) == 0.0
    # every ceil scale is the smallest scale value >= the ideal one
    s_enc = 448.0 * 6 / x.abs().max()
    u = x.abs().reshape(256, 4, 16).amax(-1) * (s_enc / 6)
    got = quantize(x, QuantSpec("fp4_e2m1", scale_rounding="ceil", **kw)).scales.reshape(256, 4)
    # at most one scale step (relative spacing 2^-3 for 3 mantissa bits) above the ideal one
    assert (got >= u).all() and (got < u * (1 + 2**-3) * (1 + 1e-6)).all()


def test_nvfp4_gradient_bias_and_the_ceil_option():
    """What 'SR unbiased' means for NVFP4 (issue 9): SR is unbiased for elements that do not
    clip, but TE's RNE block scale rounds down for about half the blocks and clips their maxima
    (~3% of elements here), so the mean of many draws stalls ~1% away from the input. With
    scale_rounding='ceil' nothing clips and the mean converges like 1/sqrt(draws)."""
    grad = recipes.get("nvfp4").grad_input.a  # E2M1, 16-blocks, UE4M3, stochastic rounding
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))

    def mean_error(spec, draws):
        gen = torch.Generator().manual_seed(1)
        acc = torch.zeros_like(x, dtype=torch.float64)
        out = {}
        for i in range(1, draws + 1):
            acc += fake_quantize(x, spec, generator=gen).double()
            out[i] = float((acc / i - x.double()).norm() / x.double().norm())
        return out

    te, ceil = mean_error(grad, 1024), mean_error(grad.replace(scale_rounding="ceil"), 1024)
    assert te[1024] > te[16] / 4  # stalls: biased by clipping
    assert ceil[1024] < ceil[16] / 6  # ~ 1/sqrt(64) = 1/8 of the 16-draw error
    assert 0.008 < te[1024] < 0.02
