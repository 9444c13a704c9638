"""Per-tensor current, delayed (TE) and row scaling (algorithms.md §2.1-2.3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lptrain.numerics import QuantSpec, ScalingState, fake_quantize, quantize
from lptrain.numerics.scaling import FLT_MAX, current_enc

from .conftest import assert_bits_equal

E4M3 = QuantSpec("fp8_e4m3", scaling="tensor")


def _enc(qt):
    return 1.0 / qt.scales.double()


@pytest.mark.parametrize("fmt,fmax", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_current_scaling_maps_amax_to_fmt_max(fmt, fmax):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3.7
    i = int(x.abs().argmax())
    amax = x.abs().max()
    enc = current_enc(amax, fmax, torch.float32)
    assert enc.item() == np.float32(fmax) / np.float32(amax.item())  # FP32 division
    assert abs(enc.item() * amax.item() - fmax) <= fmax * 2.0**-23
    y = fake_quantize(x, QuantSpec(fmt, scaling="tensor"))
    qt = quantize(x, QuantSpec(fmt, scaling="tensor"))
    assert abs(qt.values().reshape(-1)[i].item()) == fmax  # the amax element lands on +-max
    assert y[i].item() == np.float32(qt.values().reshape(-1)[i].item()) * np.float32(
        (1.0 / enc).item()
    )


def test_current_scaling_edge_cases():
    z = torch.zeros(64)
    qt = quantize(z, E4M3)
    assert qt.scales.item() == 1.0 and torch.equal(qt.dequantize(), z)
    for bad in (math.inf, math.nan):
        x = torch.tensor([1.0, -2.0, bad, 0.5])
        qt = quantize(x, E4M3)
        assert qt.scales.item() == 1.0
        y = qt.dequantize()
        assert y[[0, 1, 3]].tolist() == [1.0, -2.0, 0.5]
        # Non-finite in, non-finite out (issue 9): TE's satfinite cast would make Inf 448;
        # E4M3FN has no Inf code, so it becomes NaN (E5M2 keeps +-Inf).
        assert math.isnan(y[2])
    assert current_enc(torch.tensor(0.0), 448.0, torch.float32).item() == 1.0
    assert current_enc(torch.tensor(math.inf), 448.0, torch.float32).item() == 1.0
    assert current_enc(torch.tensor(math.nan), 448.0, torch.float32).item() == 1.0
    # tiny amax: enc Inf -> largest finite value of the input dtype
    assert current_enc(torch.tensor(1e-45), 448.0, torch.float32).item() == FLT_MAX
    bf16_max = torch.finfo(torch.bfloat16).max
    assert current_enc(torch.tensor(1e-40), 448.0, torch.bfloat16).item() == bf16_max
    xb = torch.tensor([1e-40, 0.0, -5e-41], dtype=torch.bfloat16)
    assert xb.abs().max().item() > 0
    qt = quantize(xb, E4M3)
    assert qt.scales.item() == np.float32(1.0) / np.float32(bf16_max)


def test_pow2_current_scaling():
    for s in (1.0, 3.7, 1000.0, 1e-3, 448.0, 447.99):
        x = torch.tensor([s, -s / 3, 0.1 * s])
        qt = quantize(x, QuantSpec("fp8_e4m3", scaling="tensor", pow2_scale=True))
        enc = 1.0 / qt.scales.item()
        m, _ = math.frexp(enc)
        assert m == 0.5  # an exact power of two
        assert np.float32(s) * enc <= 448.0 and np.float32(s) * enc * 2 > 448.0
    enc = current_enc(torch.tensor(3.5), 448.0, torch.float32, pow2=True)
    assert enc.item() == 128.0  # 448 / 3.5 = 128 exactly: already a power of two
    assert current_enc(torch.tensor(3.6), 448.0, torch.float32, pow2=True).item() == 64.0


# -- delayed scaling: the TE worked example (§2.2) ----------------------------------------------

AMAXES = [10.0, 20.0, 5.0, 5.0, 5.0, 5.0]
USED = {"max": [1, 44.8, 22.4, 22.4, 22.4, 89.6], "most_recent": [1, 44.8, 22.4, 89.6, 89.6, 89.6]}
HIST_MAX = [[0, 0, 10], [0, 10, 20], [0, 20, 5], [0, 5, 5], [0, 5, 5], [0, 5, 5]]


def _run_delayed(algo, margin, amaxes=AMAXES, state=None):
    spec = QuantSpec("fp8_e4m3", scaling="delayed", history_len=3, amax_algo=algo, margin=margin)
    state = state or ScalingState(history_len=3)
    used, hist = [], []
    for a in amaxes:
        enc = state.scale.item()  # the scale this step quantizes with
        x = torch.tensor([a, -a / 2, 0.25])
        qt = quantize(x, spec, state=state)
        assert qt.scales.item() == np.float32(1.0) / np.float32(enc)  # dec = 1/enc in FP32
        used.append(enc)
        hist.append(state.amax_history.tolist())
    return used, hist, state


def _te(a, margin):
    """TE's FP32 update: (448 / a) / 2^margin."""
    return float(np.float32(np.float32(448.0) / np.float32(a)) / np.float32(2.0**margin))


@pytest.mark.parametrize("algo", ["max", "most_recent"])
@pytest.mark.parametrize("margin", [0, 1])
def test_delayed_scaling_worked_example(algo, margin):
    used, hist, _ = _run_delayed(algo, margin)
    # USED rounded to 0.1 and exactly: 448/10 = 44.8, 448/20 = 22.4, 448/5 = 89.6
    assert [round(u * 2**margin, 4) if i else u for i, u in enumerate(used)] == USED[algo]
    a_used = {"max": [10, 20, 20, 20, 5], "most_recent": [10, 20, 5, 5, 5]}[algo]
    assert used == [1.0] + [_te(a, margin) for a in a_used]
    if algo == "max":
        assert hist == [[float(v) for v in h] for h in HIST_MAX]
    else:
        assert hist == [[0.0, 0.0, a] for a in AMAXES][:1] + [
            [0.0, AMAXES[i - 1], AMAXES[i]] for i in range(1, 2)
        ] + [[0.0, AMAXES[i - 1], AMAXES[i]] for i in range(2, 6)]


def test_delayed_scaling_edge_cases():
    spec = QuantSpec("fp8_e4m3", scaling="delayed", history_len=2, amax_algo="most_recent")
    st = ScalingState(history_len=2)
    quantize(torch.tensor([4.0]), spec, state=st)
    s1 = st.scale.item()
    assert s1 == 112.0
    quantize(torch.zeros(3), spec, state=st)  # zero amax keeps the previous scale
    assert st.scale.item() == s1
    for bad in (math.inf, math.nan):  # non-finite amax keeps the scale, not stored
        quantize(torch.tensor([1.0, bad]), spec, state=st)
        assert st.scale.item() == s1
        assert torch.isfinite(st.amax_history).all()
    quantize(torch.tensor([1e-45]), spec, state=st)  # tiny amax -> FP32 max
    assert st.scale.item() == FLT_MAX
    # checkpoint / restore preserves history and scale: the continuation is identical
    used_a, _, st_a = _run_delayed("max", 0, AMAXES[:3])
    saved = {k: v.clone() for k, v in st_a.state_dict().items()}
    cont_a, hist_a, _ = _run_delayed("max", 0, AMAXES[3:], state=st_a)
    st_b = ScalingState(history_len=3)
    st_b.load_state_dict(saved)
    cont_b, hist_b, _ = _run_delayed("max", 0, AMAXES[3:], state=st_b)
    assert cont_a == cont_b and hist_a == hist_b
    assert cont_a == [float(np.float32(448.0) / np.float32(20.0))] * 2 + [
        float(np.float32(448.0) / np.float32(5.0))
    ]
    with pytest.raises(ValueError, match="ScalingState"):
        quantize(torch.ones(3), QuantSpec("fp8_e4m3", scaling="delayed"))


def test_delayed_quantizes_with_the_old_scale():
    spec = QuantSpec("fp8_e4m3", scaling="delayed", history_len=4)
    st = ScalingState(history_len=4)
    y = fake_quantize(torch.tensor([500.0, 3.3]), spec, state=st)
    assert y.tolist() == [448.0, 3.25]  # step 1: scale 1, saturating cast


# -- row scaling (§2.3) -------------------------------------------------------------------------


def test_row_scaling_factorization_identity():
    g = torch.Generator().manual_seed(0)
    X = (
        torch.randn(8, 64, generator=g, dtype=torch.float64)
        * torch.rand(8, 1, generator=g, dtype=torch.float64)
        * 9
    )
    W = torch.randn(5, 64, generator=g, dtype=torch.float64)
    X[3] = 0.0  # zero row: enc 1
    for pow2 in (True, False):
        spec = QuantSpec("fp8_e4m3", scaling="row", pow2_scale=pow2)
        qx, qw = quantize(X, spec), quantize(W, spec)
        assert qx.scales.shape == (8, 1) and qx.scales[3].item() == 1.0
        lhs = qx.dequantize() @ qw.dequantize().T
        rhs = qx.scales.double() * qw.scales.double().T * (qx.values() @ qw.values().T)
        if pow2:  # power-of-two scales: exact in FP64
            assert torch.equal(lhs, rhs)
        else:
            assert torch.allclose(lhs, rhs, rtol=1e-13, atol=1e-12)  # FP64 rounding only
        assert torch.equal(qx.dequantize(), fake_quantize(X, spec))
    # every row has the same amax -> identical to per-tensor scaling
    Y = torch.randn(6, 32, generator=g)
    Y = Y / Y.abs().amax(1, keepdim=True) * 2.5
    assert_bits_equal(
        fake_quantize(Y, QuantSpec("fp8_e4m3", scaling="row")),
        fake_quantize(Y, QuantSpec("fp8_e4m3", scaling="tensor")),
    )
    # axis=0: one scale per column
    q0 = quantize(X, QuantSpec("fp8_e4m3", scaling="row", axis=0))
    assert q0.scales.numel() == 64
    assert_bits_equal(
        q0.dequantize(), fake_quantize(X.T.contiguous(), QuantSpec("fp8_e4m3", scaling="row")).T
    )


def test_scales_are_single_fp32_divisions():
    # Regression: `448.0 / tensor` in torch is reciprocal-then-multiply (two roundings).
    a = np.exp2(np.random.default_rng(0).uniform(-20, 20, 20000)).astype(np.float32)
    at = torch.from_numpy(a)
    for fmax in (448.0, 57344.0, 6.0):
        want = np.float32(fmax) / a
        assert_bits_equal(current_enc(at, fmax, torch.float32), want)
    from lptrain.numerics.scaling import delayed_enc, global_enc

    assert_bits_equal(global_enc(at, 448.0, 6.0), np.float32(2688.0) / a)
    assert global_enc(torch.tensor(10.0), 448.0, 6.0).item() == np.float32(2688.0) / np.float32(10)
    for v in a[:200]:
        got = delayed_enc(torch.tensor([v, 0.0]), torch.tensor(1.0), 448.0, "max", 1)
        assert got.item() == (np.float32(448.0) / v) / np.float32(2.0)


def test_abs_max_in_memory_order_equals_torch_amax():
    """abs_max reduces permuted views in memory order (speed); the values must be amax's."""
    import itertools

    from lptrain.numerics.scaling import abs_max

    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    x[3, 5] = float("nan")
    views = (x, x.T, x.T.reshape(48, 4, 16), x.reshape(4, 16, 48).permute(2, 0, 1))
    for v in views:
        torch.testing.assert_close(abs_max(v), v.abs().amax(), rtol=0, atol=0, equal_nan=True)
        clean = v.nan_to_num()
        assert torch.equal(abs_max(clean), clean.abs().amax())
        for r in range(1, v.dim() + 1):
            for dims in itertools.combinations(range(-v.dim(), 0), r):
                want = v.abs().amax(dim=dims, keepdim=True)
                got = abs_max(v, dims)
                assert got.shape == want.shape, (v.shape, dims)
                torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_delayed_init_current_uses_current_scaling_until_the_history_has_data():
    """delayed_init='current' (algorithms.md §2.2 pitfall): the first call is scaled by its own
    amax instead of 1 (no E5M2 underflow of tiny gradients); from then on TE's rule."""
    spec = QuantSpec("fp8_e5m2", scaling="delayed", history_len=3, delayed_init="current")
    te = spec.replace(delayed_init="one")
    x = torch.full((16,), 1e-6)
    x[0] = 3e-6
    st, st_te = ScalingState(3), ScalingState(3)
    first = fake_quantize(x, spec, state=st)
    assert torch.equal(first, fake_quantize(x, QuantSpec("fp8_e5m2"))) and first.abs().min() > 0
    assert (fake_quantize(x, te, state=st_te) == 0).float().mean() > 0.9  # TE: underflow
    for _ in range(3):  # afterwards both follow the history
        assert torch.equal(fake_quantize(x, spec, state=st), fake_quantize(x, te, state=st_te))
    zero_st = ScalingState(3)  # an all-zero first call keeps scale 1, like TE
    fake_quantize(torch.zeros(4), spec, state=zero_st)
    assert float(zero_st.scale) == 1.0
