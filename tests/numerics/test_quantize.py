"""quantize(): codes, scales, dequantize == fake_quantize bit for bit, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from lptrain.numerics import QuantSpec, ScalingState, fake_quantize, quantize

from .conftest import assert_bits_equal

SPECS = {
    "none_e4m3": QuantSpec("fp8_e4m3", scaling="none"),
    "tensor_e4m3": QuantSpec("fp8_e4m3", scaling="tensor"),
    "tensor_e5m2_pow2": QuantSpec("fp8_e5m2", scaling="tensor", pow2_scale=True),
    "delayed_e4m3": QuantSpec("fp8_e4m3", scaling="delayed", history_len=4),
    "row_e4m3": QuantSpec("fp8_e4m3", scaling="row"),
    "row_int8": QuantSpec("int8", scaling="row"),
    "tensor_int16": QuantSpec("int16", scaling="tensor", pow2_scale=True),
    "block_fp32_e4m3": QuantSpec("fp8_e4m3", scaling="block", block_size=32),
    "mxfp8": QuantSpec("fp8_e4m3", scaling="block", block_size=32, scale_format="e8m0"),
    "mxfp6_ceil": QuantSpec(
        "fp6_e3m2", scaling="block", block_size=32, scale_format="e8m0", scale_rounding="ceil"
    ),
    "mxfp4": QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="e8m0"),
    "mxfp4_sr_had": QuantSpec(
        "fp4_e2m1",
        scaling="block",
        block_size=32,
        scale_format="e8m0",
        rounding="stochastic",
        hadamard=32,
        hadamard_signs=True,
    ),
    "nvfp4": QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3"),
    "nvfp4_2d": QuantSpec("fp4_e2m1", scaling="block", block_size=(16, 16), scale_format="ue4m3"),
    "nvfp4_axis0_sr": QuantSpec(
        "fp4_e2m1",
        scaling="block",
        block_size=16,
        scale_format="ue4m3",
        axis=0,
        rounding="stochastic",
    ),
    "ue5m3": QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue5m3"),
    "quartet_std": QuantSpec(
        "fp4_e2m1",
        scaling="block",
        block_size=32,
        scale_format="e8m0",
        scale_from="std",
        hadamard=32,
    ),
}


def _x(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.exp2(torch.randint(-6, 6, (64, 1), generator=g))
    x[0, :32] = 0.0
    x[1, 3] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dequantize_equals_fake_quantize_bit_for_bit(name, dtype):
    spec = SPECS[name]
    x = _x(dtype)
    kw = {}
    if spec.scaling == "delayed" or spec.amax_refresh > 1:
        kw["state"] = ScalingState(history_len=4)
    st2 = ScalingState(history_len=4) if "state" in kw else None
    qt = quantize(x, spec, generator=torch.Generator().manual_seed(3), **kw)
    fq = fake_quantize(
        x,
        spec,
        generator=torch.Generator().manual_seed(3),
        **({"state": st2} if st2 is not None else {}),
    )
    d = qt.dequantize()
    assert d.shape == x.shape and d.dtype == fq.dtype
    if spec.fmt.is_int:  # integer codes have no -0
        assert torch.equal(d, fq)
    else:
        assert_bits_equal(d, fq)
    if spec.scaling == "delayed":  # second step uses the updated scale: still identical
        assert_bits_equal(
            quantize(x, spec, state=kw["state"]).dequantize(), fake_quantize(x, spec, state=st2)
        )


def test_code_storage():
    x = _x()
    q = quantize(x, SPECS["tensor_e4m3"])
    assert q.codes.dtype == torch.float8_e4m3fn and q.codes.numel() == x.numel()
    assert quantize(x, SPECS["tensor_e5m2_pow2"]).codes.dtype == torch.float8_e5m2
    q4 = quantize(x, SPECS["mxfp4"])
    assert q4.codes.dtype == torch.uint8 and q4.codes.numel() == x.numel() // 2 and q4.packed
    # the packed nibbles are the E2M1 codes: low nibble = even element
    v = q4.values().reshape(64, 96)
    lo = (q4.codes & 0xF).reshape(64, 48)
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    assert_bits_equal(e2m1[lo.long()], v[:, 0::2])
    q6 = quantize(x, SPECS["mxfp6_ceil"])
    assert q6.codes.dtype == torch.uint8 and q6.codes.numel() == x.numel()
    assert int(q6.codes.max()) < 64
    q16 = quantize(x, SPECS["tensor_int16"])
    assert q16.codes.dtype == torch.int16 and 2**14 <= int(q16.codes.abs().max()) <= 32767
    m, _ = torch.frexp(q16.scales)
    assert m.item() == 0.5  # pow2: int16 mantissas times 2^exponent
    assert quantize(x, SPECS["row_int8"]).codes.dtype == torch.int8
    qm = quantize(x, SPECS["mxfp8"])
    assert qm.scales.shape == (64, 3, 1)


def test_stats():
    x = torch.tensor([[1.0, 2.0, 0.0009, 500.0]])
    _, ex = fake_quantize(x, QuantSpec("fp8_e4m3", scaling="none"), with_stats=True, with_mask=True)
    st = ex["stats"]
    assert st.amax.item() == 500.0 and st.saturated.item() == 0.25
    assert st.underflow.item() == 0.25  # 0.0009 < 2^-10 -> 0
    assert ex["mask"].tolist() == [[True, True, True, False]]
    y = x.clone().reshape(-1)
    yh = torch.tensor([1.0, 2.0, 0.0, 448.0])
    want = 10 * math.log10((y.double() ** 2).sum().item() / ((y - yh).double() ** 2).sum().item())
    assert st.sqnr_db.item() == pytest.approx(want, rel=1e-6)
    q = quantize(
        torch.randn(256, generator=torch.Generator().manual_seed(0)),
        QuantSpec("fp8_e4m3"),
        with_stats=True,
    )
    assert 28 < q.stats.sqnr_db.item() < 40 and q.stats.saturated.item() == 0.0


def test_hadamard_spec_shared_signs_cancel_in_gemm():
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(32, 64, generator=g), torch.randn(16, 64, generator=g)
    spec = QuantSpec("fp8_e4m3", scaling="none", hadamard=32, hadamard_signs=True)
    xq, ex = fake_quantize(X, spec, generator=g, with_mask=True)
    wq = fake_quantize(W, spec, signs=ex["signs"])
    err = (xq @ wq.T - X @ W.T).norm() / (X @ W.T).norm()
    assert err < 0.05


def test_block_size_must_divide_axis():
    spec = QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="e8m0")
    with pytest.raises(ValueError, match=r"block_size 32 does not divide axis -1 \(length 48\)"):
        quantize(torch.ones(4, 48), spec)
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.ones(48, 64), spec.replace(axis=0))
    with pytest.raises(ValueError, match=r"tile \(16, 16\) does not divide"):
        quantize(
            torch.ones(24, 32),
            QuantSpec("fp4_e2m1", scaling="block", block_size=(16, 16), scale_format="ue4m3"),
        )
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.ones(4, 48), QuantSpec("fp8_e4m3", hadamard=32, scaling="none"))


SPECS_FOR_EDGES = {
    "fp8-tensor": QuantSpec("fp8_e4m3"),
    "e5m2-tensor": QuantSpec("fp8_e5m2"),
    "e5m2-delayed": QuantSpec("fp8_e5m2", scaling="delayed", history_len=4),
    "fp8-row": QuantSpec("fp8_e4m3", scaling="row"),
    "mxfp4": QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="e8m0"),
    "nvfp4": QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3"),
    "nvfp4-tile": QuantSpec("fp4_e2m1", scaling="block", block_size=(16, 16), scale_format="ue4m3"),
    "ue5m3-hold": QuantSpec(
        "fp4_e2m1", scaling="block", block_size=16, scale_format="ue5m3", amax_refresh=4
    ),
    "int8-tensor": QuantSpec("int8"),
    "rht-sr": QuantSpec(
        "fp4_e2m1",
        scaling="block",
        block_size=32,
        scale_format="e8m0",
        rounding="stochastic",
        hadamard=32,
        hadamard_signs=True,
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", sorted(SPECS_FOR_EDGES))
def test_empty_tensors_quantize_to_empty_and_leave_state_alone(name: str):
    spec = SPECS_FOR_EDGES[name]
    state = (
        ScalingState(history_len=4) if spec.scaling == "delayed" or spec.amax_refresh > 1 else None
    )
    before = {k: v.clone() for k, v in state.state_dict().items()} if state else {}
    x = torch.empty(0, 32)
    out, extras = fake_quantize(x, spec, state=state, with_stats=True, with_mask=True)
    assert out.shape == (0, 32) and extras["mask"].shape == (0, 32)
    assert quantize(x, spec, state=state).dequantize().shape == (0, 32)
    if state is not None:
        assert all(torch.equal(v, before[k]) for k, v in state.state_dict().items())


@pytest.mark.parametrize("name", sorted(SPECS_FOR_EDGES))
def test_nonfinite_elements_stay_nonfinite(name: str):
    """Saturating rounding must not make +-Inf finite (issue 9). E5M2 keeps +-Inf and NaN, E4M3
    gives NaN, formats without specials make the element's whole group NaN (OCP MX); the rest of
    the tensor stays finite except where the reference scale rule spoils it."""
    spec = SPECS_FOR_EDGES[name]
    g = torch.Generator().manual_seed(0)
    for bad in (float("inf"), -float("inf"), float("nan")):
        state = (
            ScalingState(history_len=4)
            if spec.scaling == "delayed" or spec.amax_refresh > 1
            else None
        )
        x = torch.randn(32, 64, generator=g)
        x[5, 7] = bad
        out = fake_quantize(x, spec, state=state, generator=torch.Generator().manual_seed(1))
        if spec.hadamard is None:
            assert not torch.isfinite(out[5, 7])
        else:  # the rotation spreads it over its 32-block
            assert not torch.isfinite(out[5, :32]).any() or not torch.isfinite(out[5]).all()
        if spec.format == "fp8_e5m2" and bad != bad:  # NaN
            assert torch.isnan(out[5, 7])
        elif spec.format == "fp8_e5m2":
            assert out[5, 7] == bad
        assert torch.isfinite(out[20]).all() or spec.scaling in ("tensor", "delayed")
        if state is not None:
            assert torch.isfinite(state.amax_history).all() and torch.isfinite(state.ref)
        # codes hold the same thing
        qt = quantize(x, spec, state=None if state is None else ScalingState(history_len=4),
                      generator=torch.Generator().manual_seed(1))  # fmt: skip
        ref = fake_quantize(x, spec, state=None if state is None else ScalingState(history_len=4),
                            generator=torch.Generator().manual_seed(1))  # fmt: skip
        assert_bits_equal(qt.dequantize(), ref)
