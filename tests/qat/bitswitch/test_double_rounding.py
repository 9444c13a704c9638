"""Double Rounding (lptrain/qat/bitswitch/double_rounding.py, quantizer.py): the §7.1 worked
example, int8 storage equals quantizing from float, both scale-gradient modes against float64,
house rules."""

from __future__ import annotations

import math

import pytest
import torch

from lptrain.qat import bitswitch as bs
from lptrain.qat.bitswitch import double_rounding as dr

EXAMPLE = [30.0, -55.5, 150.0, 7.0]  # W/s of algorithms.md §7.1


def test_algorithms_7_1_worked_example():
    w, s = torch.tensor([EXAMPLE]), torch.ones(1, 1)
    assert bs.storage_codes(w, s, 8).tolist() == [[30, -56, 127, 7]]
    want = {8: [30.0, -56.0, 127.0, 7.0], 4: [32.0, -64.0, 112.0, 0.0], 2: [0.0, -64.0, 64.0, 0.0]}
    for b, out in want.items():
        assert bs.double_round(w, s, b, 8).tolist() == [out], b
    # The intermediate I_h / 2^4 of the example, and its round-half-even codes.
    i8 = bs.storage_codes(w, s, 8).float()
    assert (i8 / 16).tolist() == [[1.875, -3.5, 7.9375, 0.4375]]
    assert bs.second_round(i8, 4, 4).tolist() == [[2.0, -4.0, 7.0, 0.0]]
    # Right-shift variant: floor(I_h / 2^d), i.e. an arithmetic shift of the integers.
    assert bs.double_round(w, s, 4, 8, rounding="shift").tolist() == [[16.0, -64.0, 112.0, 0.0]]
    shifted = (torch.tensor([30, -56, 127, 7], dtype=torch.int16) >> 4).tolist()
    assert bs.second_round(i8, 4, 4, "shift").flatten().tolist() == [float(x) for x in shifted]


def test_round_half_even_in_both_roundings():
    s = torch.ones(1, 1)
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5]])
    assert bs.double_round(w, s, 8, 8).tolist() == [[0.0, 2.0, 2.0, -0.0, -2.0]]
    i = torch.tensor([[8.0, 24.0, 40.0, -8.0]])  # / 16 = 0.5, 1.5, 2.5, -0.5 (second rounding)
    assert bs.second_round(i, 4, 4).tolist() == [[0.0, 2.0, 2.0, -0.0]]


@pytest.mark.parametrize("rounding", bs.ROUNDINGS)
@pytest.mark.parametrize("h", [8, 6])
def test_switching_from_stored_int8_equals_quantizing_from_float(rounding, h):
    g = torch.Generator().manual_seed(h)
    w = torch.randn(16, 48, generator=g) * 0.05
    w[0, :4] = torch.tensor([1.0, -1.0, 0.5, -0.7])  # far beyond the h-bit range: clamped
    s = torch.rand(16, 1, generator=g) * 0.002 + 0.0005
    stored = bs.storage_codes(w, s, h)
    assert stored.dtype == torch.int8 and int(stored.max()) <= 2 ** (h - 1) - 1
    for b in range(2, h + 1):
        from_float = bs.double_round(w, s, b, h, rounding=rounding)
        q = bs.second_round(stored.float(), h - b, b, rounding)
        assert torch.equal(dr.dequantize(q, s, h - b), from_float), b


def _case(bits, h=8, out=6, inp=32, seed=0):
    g = torch.Generator().manual_seed(seed + bits)
    w = (torch.randn(out, inp, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    s = (torch.rand(out, 1, generator=g, dtype=torch.float64) * 0.004 + 0.002).requires_grad_()
    dy = torch.randn(out, inp, generator=g, dtype=torch.float64)
    return w, s, dy, dr.weight_grad_scale(inp, bits)


@pytest.mark.parametrize("rounding", bs.ROUNDINGS)
@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_corrected_backward_equals_ste_surrogate_float64(bits, rounding):
    w, s, dy, g = _case(bits)
    out = bs.double_round(w, s, bits, 8, rounding=rounding, g=g)
    ref = bs.ste_reference(w, s, bits, 8, rounding, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)
    got, want = torch.autograd.grad(out, (w, s), dy), torch.autograd.grad(ref, (w, s), dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    v = w.detach() / (s.detach() * 2 ** (8 - bits))
    n, p = dr.signed_bounds(bits)
    assert 0 < int(((v < n) | (v > p)).sum()) < v.numel()  # both regions exercised


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_faithful_backward_equals_reference_formula_float64(bits):
    w, s, dy, g = _case(bits, seed=5)
    out = bs.double_round(w, s, bits, 8, faithful=True, g=g)
    dw, ds = torch.autograd.grad(out, (w, s), dy)
    torch.testing.assert_close(
        ds, bs.faithful_reference_scale_grad(w, s, dy, bits, 8, g), rtol=1e-11, atol=1e-13
    )
    assert torch.unique(ds).numel() == 1  # quirk (b): one value broadcast to every channel
    (dw_c,) = torch.autograd.grad(bs.double_round(w, s, bits, 8, g=g), (w,), dy)
    assert torch.equal(dw, dw_c)  # the weight gradient is the same straight-through one


def test_the_two_quirks_exactly():
    """One channel, no double-rounding ties: corrected = 2^d x faithful (quirk a); several
    channels: faithful hands each channel the sum of all (quirk b)."""
    w = torch.tensor([[0.013, -0.021, 0.3, 0.0072]], dtype=torch.float64)
    s = torch.tensor([[0.001]], dtype=torch.float64, requires_grad=True)
    for bits in (8, 6, 4):
        d = 8 - bits
        a = torch.autograd.grad(bs.double_round(w, s, bits, 8, g=1.0).sum(), s)[0]
        f = torch.autograd.grad(bs.double_round(w, s, bits, 8, faithful=True, g=1.0).sum(), s)[0]
        torch.testing.assert_close(a, f * 2**d, rtol=1e-12, atol=0)
    w2 = torch.cat([w, -w * 0.7])
    s2 = torch.tensor([[0.001], [0.002]], dtype=torch.float64, requires_grad=True)
    per_row = torch.autograd.grad(bs.double_round(w2, s2, 8, 8, g=1.0).sum(), s2)[0]
    broad = torch.autograd.grad(bs.double_round(w2, s2, 8, 8, faithful=True, g=1.0).sum(), s2)[0]
    assert broad.flatten().tolist() == pytest.approx([per_row.sum().item()] * 2, rel=1e-12)


def test_grad_scale_uses_elements_per_channel():
    assert dr.weight_grad_scale(64, 4) == pytest.approx(1 / math.sqrt(64 * 7))
    assert dr.weight_grad_scale(64, 2) == pytest.approx(1 / 8)


def test_quantizer_init_and_house_rules():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 64, generator=g)
    q = bs.DoubleRoundingQuantizer((4, 64), (2, 8, 4, 6))
    assert q.bits == (8, 6, 4, 2) and q.h == 8
    q.init_from(w)
    mu, sd = w.mean(-1, keepdim=True), w.std(-1, keepdim=True, correction=0)
    want = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 128
    torch.testing.assert_close(q.step.detach(), want)
    with pytest.raises(ValueError, match="bits: 3 is not a candidate"):
        q(w, 3)
    bad = w.clone()
    bad[0, 0], bad[1, 1], bad[2, 2] = float("nan"), float("inf"), -float("inf")
    out = q(bad, 4)
    assert out[0, 0].isnan() and out[1, 1] == float("inf") and out[2, 2] == -float("inf")
    assert torch.isfinite(out[3]).all()
    empty = q(torch.zeros(4, 0), 4)
    assert empty.shape == (4, 0)
    codes = q.integer_codes(w, 4)
    assert codes.dtype == torch.int8 and torch.equal(q.dequantize_codes(codes, 4), q(w, 4))
