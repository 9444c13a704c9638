"""INT16 dynamic fixed point with a shared exponent (algorithms.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lptrain.numerics import DFPTensor, dfp_matmul, dfp_quantize, fake_quantize_dfp


def _g(s):
    return torch.Generator().manual_seed(s)


def test_worked_example():
    d = dfp_quantize(torch.tensor([0.75, -0.1, 3.2]))
    assert int(d.exponent) == -13 and d.mantissa.dtype == torch.int16
    assert d.mantissa.tolist() == [6144, -819, 26214]
    assert d.dequantize().tolist() == [0.75, -819 * 2.0**-13, 26214 * 2.0**-13]
    assert torch.allclose(d.dequantize(), torch.tensor([0.75, -0.0999756, 3.1999512]), atol=1e-7)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 7.0, 1e5, 3e37])
def test_max_maps_into_range_and_round_trip_bound(scale):
    x = torch.randn(4096, generator=_g(1)) * scale
    d = dfp_quantize(x)
    E = int(d.exponent)
    m = d.mantissa.to(torch.int64).abs().max().item()
    assert 2**14 <= x.abs().max().item() * 2.0**-E < 2**15
    assert 2**14 <= m <= 2**15 - 1
    err = (d.dequantize().double() - x.double()).abs().max().item()
    assert err <= 2.0 ** (E - 1)
    if scale != 1.0:
        return
    # per-slice exponents along an axis
    X = x.reshape(64, 64) * torch.exp2(torch.arange(64.0)).reshape(64, 1) * 2.0**-32
    ds = dfp_quantize(X, axis=1)
    assert ds.exponent.shape == (64, 1)
    amax = X.abs().amax(1, keepdim=True).double()
    k = amax * torch.exp2(-ds.exponent.double())
    assert bool(((k >= 2**14) & (k < 2**15)).all())
    e = (ds.dequantize().double() - X.double()).abs()
    assert bool((e <= torch.exp2(ds.exponent.double() - 1)).all())


def test_zero_saturation_and_stochastic():
    d = dfp_quantize(torch.zeros(5))
    assert int(d.exponent) == 0 and d.mantissa.tolist() == [0] * 5
    # amax . 2^-E in [32767.5, 32768) rounds to 32768: saturates to 32767 (documented)
    x = torch.tensor([32767.75, -32767.75, 1.0]) * 2.0**-20
    d = dfp_quantize(x)
    assert int(d.exponent) == -20 and d.mantissa.tolist() == [32767, -32767, 1]
    # stochastic: the two neighbours, unbiased, reproducible
    v = torch.full((100000,), 0.3) * 1.0
    v[0] = 1.0  # amax 1 -> E = -14, 0.3 * 2^14 = 4915.2
    d = dfp_quantize(v, rounding="stochastic", generator=_g(0))
    m = d.mantissa[1:].double()
    assert set(m.unique().tolist()) == {4915.0, 4916.0}
    p = float(torch.tensor(0.3) * 2**14) - 4915
    assert abs((m == 4916).double().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / m.numel())
    d2 = dfp_quantize(v, rounding="stochastic", generator=_g(0))
    assert torch.equal(d.mantissa, d2.mantissa)
    assert torch.equal(fake_quantize_dfp(v), dfp_quantize(v).dequantize())


def test_chunked_gemm_equals_fp64_gemm_of_dequantized_operands():
    A = torch.randn(16, 256, generator=_g(2)) * 0.01
    B = torch.randn(24, 256, generator=_g(3)) * 0.01
    A[:, :2] = 0.05  # keep the amax fixed-ish
    da, db = dfp_quantize(A, bits=8), dfp_quantize(B, bits=8)  # small mantissas: no overflow
    for chunk in (1, 16, 32, 256):
        r = dfp_matmul(da, db, chunk=chunk)
        assert r.overflows == 0 and r.chunks == 16 * 24 * math.ceil(256 / chunk)
        want = da.dequantize().double() @ db.dequantize().double().T
        # FP32 accumulation of ceil(K / chunk) exactly converted chunk sums
        n = math.ceil(256 / chunk)
        tol = (
            (n + 1) * 2.0**-24 * (da.dequantize().double().abs() @ db.dequantize().double().abs().T)
        )
        assert bool(((r.out.double() - want).abs() <= tol).all())
    # 16-bit mantissas with a short enough chunk: exact integer chunk sums, no overflow
    d16a, d16b = dfp_quantize(A), dfp_quantize(B)
    r = dfp_matmul(d16a, d16b, chunk=2)
    assert r.overflows == 0
    want = d16a.dequantize().double() @ d16b.dequantize().double().T
    tol = 129 * 2.0**-24 * (d16a.dequantize().double().abs() @ d16b.dequantize().double().abs().T)
    assert bool(((r.out.double() - want).abs() <= tol).all())


def test_adversarial_input_overflows_and_wraps_exactly():
    a = DFPTensor(
        torch.full((2, 8), 32767, dtype=torch.int16), torch.tensor(-10, dtype=torch.int32)
    )
    b = DFPTensor(
        torch.full((3, 8), 32767, dtype=torch.int16), torch.tensor(-12, dtype=torch.int32)
    )
    b.mantissa[1] = -32767
    b.mantissa[2, ::2] = -32767  # sums cancel: no overflow in that column
    r = dfp_matmul(a, b, chunk=4)
    # chunk sums +-4 . 32767^2 = +-4294705156 overflow int32; column 2 sums to 0
    assert r.overflows == 2 * 2 * 2 and r.chunks == 2 * 3 * 2
    s = np.array([4 * 32767**2, -4 * 32767**2, 0], dtype=np.int64)
    wrapped = s.astype(np.int32)  # numpy: two's-complement wrap
    assert wrapped.tolist() == [-262140, 262140, 0]
    want = (2 * wrapped.astype(np.float32)) * np.float32(2.0**-22)
    assert r.out.tolist() == [want.tolist()] * 2
    # a long chunk with 16-bit inputs also reports it
    x = torch.ones(4, 64)
    r = dfp_matmul(dfp_quantize(x), dfp_quantize(x), chunk=64)
    assert r.overflows == 16


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 517, 1030])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_any_non_finite_element_raises(bad, where, axis):
    # The check reads the amax (max propagates NaN, |Inf| is Inf): every position of a
    # tensor long enough for vectorized reductions, per tensor and per slice.
    x = torch.randn(1031, 3, generator=torch.Generator().manual_seed(0))
    x[where, where % 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        dfp_quantize(x, axis=axis)


def test_empty_tensors():
    d = dfp_quantize(torch.zeros(0, 4))
    assert d.mantissa.shape == (0, 4) and int(d.exponent) == 0
    k = dfp_quantize(torch.randn(3, 4))
    assert dfp_matmul(d, k).out.shape == (0, 3)
    empty_k = dfp_quantize(torch.zeros(2, 0))
    assert torch.equal(dfp_matmul(empty_k, dfp_quantize(torch.zeros(3, 0))).out, torch.zeros(2, 3))


def test_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        dfp_quantize(torch.tensor([1.0, math.nan]))
    with pytest.raises(TypeError):
        dfp_quantize(torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="per-tensor"):
        dfp_matmul(dfp_quantize(torch.ones(2, 4), axis=1), dfp_quantize(torch.ones(2, 4)))


def _reference_dfp_matmul(a: DFPTensor, b: DFPTensor, chunk: int) -> tuple[torch.Tensor, int]:
    """The definition, slowly: int64 chunk sums, int32 wrap, ldexp to float32, summed in order."""
    ia, ib = a.mantissa.to(torch.int64), b.mantissa.to(torch.int64)
    exp = torch.tensor(int(a.exponent) + int(b.exponent))
    out = torch.zeros(ia.shape[0], ib.shape[0])
    overflows = 0
    for start in range(0, ia.shape[1], chunk):
        s = ia[:, start : start + chunk] @ ib[:, start : start + chunk].T
        wrapped = ((s + 2**31) % 2**32) - 2**31
        overflows += int((wrapped != s).sum())
        out = out + torch.ldexp(wrapped.to(torch.float32), exp)
    return out, overflows


# 2^e with e = -28: the usual unit-scale case; -140 and -150: not a normal float32 (subnormal
# and underflowing results); 80: large but finite (the fast path's upper range).
@pytest.mark.parametrize("exp_a,exp_b", [(-14, -14), (-70, -70), (-75, -75), (40, 40)])
def test_chunked_gemm_is_bitwise_the_definition(exp_a, exp_b):
    g = _g(7)
    ma = torch.randint(-32767, 32768, (24, 96), generator=g, dtype=torch.int16)
    mb = torch.randint(-32767, 32768, (16, 96), generator=g, dtype=torch.int16)
    mb[3] = 32767  # with a row of ma at its max: chunk sums past 2^31 wrap
    ma[5] = 32767
    a = DFPTensor(ma, torch.tensor(exp_a, dtype=torch.int32))
    b = DFPTensor(mb, torch.tensor(exp_b, dtype=torch.int32))
    for chunk in (1, 8, 32, 96):
        res = dfp_matmul(a, b, chunk=chunk)
        want, overflows = _reference_dfp_matmul(a, b, chunk)
        assert torch.equal(res.out.view(torch.int32), want.view(torch.int32)), chunk
        assert res.overflows == overflows
    assert overflows > 0


def test_overflow_recompute_gives_the_exact_chunk_sums():
    """overflow='recompute' (the recipe default): flagged chunks are redone exactly, so the
    result equals the float64 GEMM of the DFP operands rounded per chunk, and still counts."""
    a = DFPTensor(
        torch.full((2, 8), 32767, dtype=torch.int16), torch.tensor(-10, dtype=torch.int32)
    )
    b = DFPTensor(
        torch.full((3, 8), 32767, dtype=torch.int16), torch.tensor(-12, dtype=torch.int32)
    )
    b.mantissa[1] = -32767
    r = dfp_matmul(a, b, chunk=4, overflow="recompute")
    assert r.overflows == 2 * 3 * 2  # every chunk sum is +-4 . 32767^2
    # each exact chunk sum +-4 . 32767^2 is rounded once to float32, the two chunks add in FP32
    c = float(np.float32(4 * 32767**2)) * 2 * 2.0**-22
    assert r.out.tolist() == [[c, -c, c]] * 2
    exact = a.dequantize().double() @ b.dequantize().double().T
    assert torch.allclose(r.out.double(), exact, rtol=2**-24)
    with pytest.raises(ValueError, match="overflow must be one of"):
        dfp_matmul(a, b, overflow="saturate")


# 40: all 5 rows, 2 chunks per batched GEMM; 16: blocks of 4 rows and 1 row, 1 chunk each.
@pytest.mark.parametrize("block", [2 * 5 * 4, 16])
def test_batched_chunks_and_the_overflow_bound_keep_the_definition(monkeypatch, block):
    """Row blocks and chunk groups smaller than the operand, K not a multiple of the chunk, and
    both sides of the Cauchy-Schwarz bound that lets a chunk skip the overflow check: two
    full-scale products sum to 2^31 - 131070 (proven safe, and it is), three overflow (not
    provable)."""
    import lptrain.numerics.dfp as dfp

    monkeypatch.setattr(dfp, "_BLOCK_ELEMENTS", block)
    g = _g(3)
    ma = torch.randint(-300, 301, (5, 13), generator=g, dtype=torch.int16)
    mb = torch.randint(-300, 301, (4, 13), generator=g, dtype=torch.int16)
    ma[0, 4:6] = mb[1, 4:6] = 32767  # chunk 2 (chunk=2): 2 . 32767^2 < 2^31, bound < 2^62
    ma[2, 8:10] = mb[3, 8:10] = -32767
    a = DFPTensor(ma, torch.tensor(-20, dtype=torch.int32))
    b = DFPTensor(mb, torch.tensor(-3, dtype=torch.int32))
    fa = ma.double().reshape(5, 1, 13)
    norms = dfp._chunk_norms
    safe = dfp._no_overflow_possible(
        norms(fa[:, :, 4:6]), norms(mb.double().reshape(4, 1, 13)[:, :, 4:6])
    )
    assert safe == [True]
    for chunk in (2, 3, 5):
        for mode in ("wrap", "recompute"):
            res = dfp_matmul(a, b, chunk=chunk, overflow=mode)
            if mode == "wrap":
                want, overflows = _reference_dfp_matmul(a, b, chunk)
                assert torch.equal(res.out.view(torch.int32), want.view(torch.int32)), chunk
                assert res.overflows == overflows
            assert res.chunks == 5 * 4 * math.ceil(13 / chunk)
    # chunk 3 holds three full-scale products in row 0 x row 1: 3 . 32767^2 overflows
    ma[0, 3] = mb[1, 3] = 32767
    unsafe = dfp._no_overflow_possible(
        norms(ma.double()[:, 3:6].reshape(5, 1, 3)), norms(mb.double()[:, 3:6].reshape(4, 1, 3))
    )
    assert unsafe == [False]
    res = dfp_matmul(a, b, chunk=3, overflow="wrap")
    want, overflows = _reference_dfp_matmul(a, b, 3)
    assert overflows > 0 and res.overflows == overflows
    assert torch.equal(res.out.view(torch.int32), want.view(torch.int32))
