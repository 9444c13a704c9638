"""LSQ / LSQ+ (lptrain/qat/lsq.py, quantizer.py): worked example, custom backward vs the STE
surrogate in float64, clamp-region gradients, inits, house rules."""

from __future__ import annotations

import math

import pytest
import torch

from lptrain.qat import LSQQuantizer, bounds, grad_scale, lsq_fake_quantize, ste_reference


def test_algorithms_5_1_worked_example():
    v = torch.tensor([-1.0, 0.3, 0.9, 2.5], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    n, p = bounds(3, signed=True)
    assert (n, p) == (-4, 3)
    g = grad_scale(4, p)
    assert g == pytest.approx(1 / math.sqrt(12))
    out = lsq_fake_quantize(v, s, None, n, p, g)
    assert out.tolist() == [-1.0, 0.5, 1.0, 1.5]
    out.sum().backward()
    assert v.grad.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert s.grad.item() == pytest.approx(1.0392305, abs=1e-7)  # 3.6 g


def _case(shape, step_shape, offset: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).requires_grad_()
    s = (torch.rand(step_shape, generator=g, dtype=torch.float64) * 0.3 + 0.2).requires_grad_()
    b = (torch.randn(step_shape, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return v, s, (b if offset else None), dy


@pytest.mark.parametrize("offset", [False, True], ids=["lsq", "lsq+"])
@pytest.mark.parametrize(
    "shape,step_shape", [((6, 16), ()), ((6, 16), (6, 1)), ((6, 4, 4), (6, 4, 1))]
)
@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (8, True), (3, False)])
def test_custom_backward_equals_ste_surrogate_float64(offset, shape, step_shape, bits, signed):
    n, p = bounds(bits, signed)
    g = grad_scale(16, p)
    v, s, b, dy = _case(shape, step_shape, offset, seed=bits * 7 + len(step_shape))
    tensors = [t for t in (v, s, b) if t is not None]
    out = lsq_fake_quantize(v, s, b, n, p, g)
    got = torch.autograd.grad(out, tensors, dy)
    ref_out = ste_reference(v, s, b, n, p, g)
    want = torch.autograd.grad(ref_out, tensors, dy)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)  # s·g + (s - s·g) ≈ s
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)


def test_clamp_region_gradients_are_exactly_bounds():
    n, p = bounds(4, True)
    v = torch.tensor([-100.0, 100.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    out = lsq_fake_quantize(v, s, b, n, p, 1.0)
    below = torch.tensor([1.0, 0.0], dtype=torch.float64)
    dv, ds, db = torch.autograd.grad(out, (v, s, b), below, retain_graph=True)
    assert dv.tolist() == [0.0, 0.0] and ds.item() == n and db.item() == 1.0
    _, ds, _ = torch.autograd.grad(out, (v, s, b), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert ds.item() == p


def test_finite_difference_of_surrogate_away_from_boundaries():
    # Inside the grid and away from rounding ties, d v̂/d s is round(u) - u; check the
    # surrogate's value against a central difference of the 'unrounded-codes' function.
    n, p = bounds(4, True)
    v = torch.tensor([0.33, -0.71, 1.12], dtype=torch.float64)
    s = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    out = lsq_fake_quantize(v, s, None, n, p, 1.0)
    (ds,) = torch.autograd.grad(out.sum(), s)
    q = torch.round(v / 0.25)
    h = 1e-6
    fd = ((q * (0.25 + h) - v) - (q * (0.25 - h) - v)).sum() / (2 * h)  # d(q s)/ds, q fixed
    dudS = (-(v / 0.25) / 0.25 * 0.25).sum()  # s · du/ds = -u
    torch.testing.assert_close(ds, fd + dudS, rtol=1e-8, atol=1e-8)


def test_inits_on_fixed_tensors():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.5, -0.5, 0.5]])
    q = LSQQuantizer(4, granularity="channel", shape=(2, 4))
    q.init_from(w)
    p = 7
    assert torch.allclose(q.step.squeeze(1), torch.tensor([2 * 2.5, 2 * 0.5]) / p**0.5)
    qp = LSQQuantizer(4, granularity="tensor", offset=True, shape=(2, 4))
    qp.init_from(w)
    mu, sd = w.mean(), w.std(correction=0)
    want = max(abs(mu - 3 * sd), abs(mu + 3 * sd)) / 8
    assert qp.step.item() == pytest.approx(float(want), rel=1e-6) and qp.offset.item() == 0.0
    act = LSQQuantizer(8, signed=False, offset=True, role="input")
    act.init_from(torch.tensor([[-0.5, 1.0], [2.0, 3.5]]))
    assert act.step.item() == pytest.approx(4.0 / 255) and act.offset.item() == -0.5
    assert bool(act.initialized)


def test_group_layout_is_row_major_along_inputs():
    w = torch.arange(16.0).reshape(2, 8)
    q = LSQQuantizer(8, granularity="group", group_size=4, shape=(2, 8))
    q.init_from(w)
    # groups: row 0 -> [0..3], [4..7]; row 1 -> [8..11], [12..15]
    means = torch.tensor([[1.5, 5.5], [9.5, 13.5]])
    assert torch.allclose(q.step.squeeze(-1), 2 * means / 127**0.5)


def test_validation_messages():
    with pytest.raises(ValueError, match="bits: must be in 2..8, got 9"):
        LSQQuantizer(9)
    with pytest.raises(ValueError, match="group_size: 48 does not divide in_features 64"):
        LSQQuantizer(4, granularity="group", group_size=48, shape=(8, 64))


def test_non_finite_propagates_and_empty_works():
    q = LSQQuantizer(4, granularity="channel", shape=(2, 3))
    q.init_from(torch.ones(2, 3))
    w = torch.tensor([[1.0, float("inf"), float("nan")], [-float("inf"), 0.0, 2.0]])
    out = q(w)
    assert torch.isinf(out[0, 1]) and torch.isnan(out[0, 2]) and torch.isinf(out[1, 0])
    assert torch.isfinite(q.step).all()
    a = LSQQuantizer(8, role="input")
    a.init_from(torch.zeros(0, 4))  # nothing to learn from: stays uncalibrated
    assert not bool(a.initialized)
    assert a(torch.zeros(0, 4)).shape == (0, 4)


def test_export_codes_reproduce_the_forward_bit_for_bit():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for offset in (False, True):
        q = LSQQuantizer(3, granularity="group", group_size=16, offset=offset, shape=(16, 64))
        q.init_from(w)
        with torch.no_grad():
            q.step.mul_(0.9)
            if offset:
                q.offset.add_(0.01)
        codes = q.integer_codes(w)
        assert codes.dtype == torch.int8 and codes.min() >= -4 and codes.max() <= 3
        assert torch.equal(q.dequantize_codes(codes), q(w))
