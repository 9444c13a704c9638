"""Stochastic rounding (algorithms.md §1.3, §1.4): neighbours only, unbiased, reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lptrain.numerics import decode_table, get_format, round_to_format

from .conftest import assert_bits_equal

FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]


def _neighbours(a: np.ndarray, name: str):
    """(lo, hi): adjacent grid values with lo <= a <= hi, from the decode table."""
    t = decode_table(name).numpy().astype(np.float64)
    g = np.unique(t[np.isfinite(t) & (t >= 0)])
    i = np.searchsorted(g, a, side="right") - 1
    lo = g[i]
    hi = np.where(g[i] == a, a, g[np.minimum(i + 1, len(g) - 1)])
    return lo, hi


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", FORMATS)
def test_outputs_are_neighbours_and_grid_points_fixed(name):
    fmt = get_format(name)
    rng = np.random.default_rng(7)
    a = np.exp2(
        rng.uniform(math.log2(fmt.min_subnormal) - 4, math.log2(fmt.max_finite), 100000)
    ).astype(np.float32)
    s = np.where(rng.random(a.size) < 0.5, -1, 1).astype(np.float32)
    x = torch.from_numpy(a * s)
    r = round_to_format(x, name, rounding="stochastic", generator=_gen(1)).numpy()
    lo, hi = _neighbours(a.astype(np.float64), name)
    m = np.abs(r).astype(np.float64)
    assert ((m == lo) | (m == hi)).all()
    assert (np.sign(r[r != 0]) == s[r != 0]).all()
    # both neighbours occur (the draw is not a disguised floor/ceil)
    off = lo != hi
    assert 0.2 < np.mean(m[off] == hi[off]) < 0.8
    # grid points (every finite code, both signs) are returned unchanged
    g = decode_table(name)
    g = g[torch.isfinite(g)]
    for seed in range(3):
        assert_bits_equal(round_to_format(g, name, rounding="stochastic", generator=_gen(seed)), g)


@pytest.mark.parametrize(
    "name,x,lo,hi,p",
    [
        ("fp4_e2m1", 0.3, 0.0, 0.5, 0.6),  # §1.4 reference probabilities
        ("fp4_e2m1", 5.0, 4.0, 6.0, 0.5),
        ("fp8_e4m3", 2.0**-11, 0.0, 2.0**-9, 0.25),
        ("fp8_e4m3", 300.0, 288.0, 320.0, 0.375),
        ("fp8_e4m3", 15.75, 15.0, 16.0, 0.75),  # the carry crosses into the next binade
        ("fp8_e4m3", -0.0146484375, -0.015625, -0.013671875, 0.5),  # top subnormal -> min normal
        ("fp8_e5m2", 1.1 * 2.0**-17, 0.0, 2.0**-16, 0.55),
        ("fp6_e3m2", 27.0, 24.0, 28.0, 0.75),
        ("fp6_e2m3", -0.2, -0.25, -0.125, 0.6),  # P(lo = -0.25): SR is odd-symmetric
    ],
)
def test_monte_carlo_mean_and_probability(name, x, lo, hi, p):
    n = 100_000
    xs = torch.full((n,), x, dtype=torch.float32)
    r = round_to_format(xs, name, rounding="stochastic", generator=_gen(42)).double()
    assert bool(((r == lo) | (r == hi)).all())
    far = hi if x > 0 else lo
    freq = float((r == far).double().mean())
    se = math.sqrt(p * (1 - p) / n)
    assert abs(freq - p) <= 5 * se, (freq, p)
    x32 = float(torch.tensor(x, dtype=torch.float32))
    assert abs(float(r.mean()) - x32) <= 5 * se * (hi - lo)


def test_unbiased_on_many_values_at_once():
    # 64 random values, 20000 draws each: every mean within 5 standard errors.
    g = _gen(3)
    x = (torch.randn(64, generator=g) * 3).clamp(-5.9, 5.9)  # below max: no saturation bias
    n = 20000
    r = round_to_format(x.repeat(n, 1), "fp4_e2m1", rounding="stochastic", generator=g).double()
    lo, hi = _neighbours(np.abs(x.double().numpy()), "fp4_e2m1")
    pr = (np.abs(x.double().numpy()) - lo) / np.where(hi > lo, hi - lo, 1)
    se = np.sqrt(pr * (1 - pr) / n) * (hi - lo)
    err = np.abs(r.mean(0).numpy() - x.double().numpy())
    assert (err <= 5 * se + 1e-12).all()


def test_same_seed_same_draw_different_seed_differs():
    x = torch.randn(10000, generator=_gen(0))
    a = round_to_format(x, "fp8_e4m3", rounding="stochastic", generator=_gen(5))
    b = round_to_format(x, "fp8_e4m3", rounding="stochastic", generator=_gen(5))
    c = round_to_format(x, "fp8_e4m3", rounding="stochastic", generator=_gen(6))
    assert_bits_equal(a, b)
    assert not torch.equal(a, c)
    # a generator advances: two calls on one generator differ
    g = _gen(5)
    d1 = round_to_format(x, "fp4_e2m1", rounding="stochastic", generator=g)
    d2 = round_to_format(x, "fp4_e2m1", rounding="stochastic", generator=g)
    assert not torch.equal(d1, d2)


def test_odd_symmetry_and_specials():
    x = torch.randn(5000, generator=_gen(9))
    a = round_to_format(x, "fp6_e3m2", rounding="stochastic", generator=_gen(1))
    b = round_to_format(-x, "fp6_e3m2", rounding="stochastic", generator=_gen(1))
    assert_bits_equal(b, -a)  # same uniforms => exactly mirrored
    s = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 500.0, -1e-30])
    r = round_to_format(s, "fp8_e4m3", rounding="stochastic", generator=_gen(1))
    assert math.isnan(r[0])
    assert_bits_equal(r[1:6], torch.tensor([448.0, -448.0, -0.0, 0.0, 448.0]))
    assert r[6].item() == 0.0 and torch.signbit(r[6])  # -tiny -> -0 (w.p. 1 - 1e-30/2^-9)
    r = round_to_format(
        s[:3], "fp8_e5m2", rounding="stochastic", overflow="ieee", generator=_gen(1)
    )
    assert math.isnan(r[0]) and r[1:].tolist() == [math.inf, -math.inf]


def _sr_bits_qpytorch(x: np.ndarray, mbits: int, rng) -> np.ndarray:
    """Implementation B of §1.3 (QPyTorch): add random low bits to the FP32 pattern, truncate.
    Valid for FP32 inputs in the target's normal range."""
    k = 23 - mbits
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = rng.integers(0, 1 << k, size=x.shape, dtype=np.uint64)
    out = ((b + r) & ~np.uint64((1 << k) - 1)).astype(np.uint32)
    return out.view(np.float32)


def test_implementations_A_and_B_agree_in_distribution():
    n = 100_000
    rng = np.random.default_rng(0)
    for x in (1.3, 37.7, 0.0213):
        b = _sr_bits_qpytorch(np.full(n, x, np.float32), 3, rng)
        a = round_to_format(
            torch.full((n,), x), "fp8_e4m3", rounding="stochastic", generator=_gen(17)
        ).numpy()
        assert set(np.unique(a)) == set(np.unique(b))
        hi = a.max()
        pa, pb = np.mean(a == hi), np.mean(b == hi)
        # two-proportion z test (chi-square with one degree of freedom)
        p = (pa + pb) / 2
        z = abs(pa - pb) / math.sqrt(2 * p * (1 - p) / n)
        assert z < 5, (x, pa, pb)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_stochastic_other_dtypes(dtype):
    x = (torch.randn(20000, generator=_gen(2)) * 10).to(dtype)
    r = round_to_format(x, "fp4_e2m1", rounding="stochastic", generator=_gen(4))
    assert r.dtype == dtype
    lo, hi = _neighbours(np.abs(x.double().numpy()).clip(0, 6), "fp4_e2m1")
    m = r.abs().double().numpy()
    assert ((m == lo) | (m == hi)).all()


def _sr_definition(x: torch.Tensor, name: str, g: torch.Generator) -> torch.Tensor:
    """The draws that define stochastic rounding on FP32 (algorithms.md §1.3), written out:
    one randint per element in row-major order (implementation B, the random bits), then one
    uniform per element below min_normal or NaN, in row-major order, for the reference
    floor + Bernoulli (implementation A, with the frexp quantum); saturated."""
    from lptrain.numerics.rounding import round_magnitude

    fmt = get_format(name)
    x = x.contiguous()
    k = 23 - fmt.mbits
    inc = torch.randint(0, 1 << k, x.shape, generator=g, dtype=torch.int32)
    r = (x.view(torch.int32) + inc) & ~((1 << k) - 1)
    r = r.view(torch.float32).reshape(-1).clone()
    small = (~(x.abs() >= fmt.min_normal)).reshape(-1)
    xs = x.reshape(-1)[small]
    r[small] = torch.copysign(round_magnitude(xs.abs(), fmt, "stochastic", g), xs)
    return r.reshape(x.shape).clamp(-fmt.max_finite, fmt.max_finite)


@pytest.mark.parametrize("name", FORMATS)
def test_fast_path_draws_and_bits_are_the_definition(name):
    """The fast path (contiguous copy, constant quantum below min_normal) against the written-
    out definition: the same bits, NaN payloads included, and the generator left in the same
    state, on transposed views too (their draws follow the logical order) and an empty tensor."""
    from .test_rounding import _adversarial

    fmt = get_format(name)
    x = torch.cat([_adversarial(name), torch.randn(4000, generator=_gen(5)) * fmt.max_finite])
    xt = x[: x.numel() // 8 * 8].reshape(8, -1).T
    blocks = xt.reshape(xt.shape[0], 4, 2)  # a grouped view of a transposed operand
    for t in (x, xt, blocks, torch.empty(0, 3)):
        g1, g2 = _gen(11), _gen(11)
        got = round_to_format(t, name, rounding="stochastic", generator=g1)
        assert_bits_equal(got, _sr_definition(t, name, g2))
        assert torch.equal(g1.get_state(), g2.get_state())
