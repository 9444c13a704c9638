"""kernels/fp8.py against lptrain.numerics.quantize / fake_quantize: tensorwise current and
delayed scaling with the transposed copy, rowwise with the column-wise copy, bit for bit
(codes, scales, dequantized values) on ordinary, tie, saturating, subnormal and zero inputs;
stochastic rounding against the bits-fed reference; non-finite inputs; empty operands."""

from __future__ import annotations

import pytest
import torch

from lptrain.kernels import fp8
from lptrain.kernels.reference import fake_quantize_with_bits, philox_bits
from lptrain.numerics import QuantSpec, ScalingState, fake_quantize, quantize
from lptrain.numerics.scaling import abs_max

from .conftest import DEVICE, assert_same, randn

E4M3, E5M2 = "fp8_e4m3", "fp8_e5m2"


def _operand(seed: int, dtype=torch.float32) -> torch.Tensor:
    x = randn(48, 160, seed=seed, scale=3.0)
    x[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-38, 7.0, -7.0, 2.0**-12, 3.0])
    return x.to(dtype)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensorwise_current_with_transposed_copy(fmt: str, dtype):
    x = _operand(1, dtype)
    spec = QuantSpec(fmt)
    got = fp8.quantize_tensorwise(x, spec, transpose=True, dense=torch.float32)
    ref = quantize(x, spec)
    assert_same(got.codes, ref.codes, "codes")
    assert_same(got.codes_t, ref.codes.T.contiguous(), "transposed codes")
    assert_same(got.scales, ref.scales, "scale")
    assert_same(got.dense, fake_quantize(x, spec), "dequantized")


def test_tiny_bf16_amax_gets_the_bf16_max_scale():
    # 1e-37: normal in bf16 (the CPU interpreter mis-converts bf16 subnormals; GPUs do not)
    x = torch.full((16, 32), 1e-37, device=DEVICE).to(torch.bfloat16)
    spec = QuantSpec(E4M3)
    got = fp8.quantize_tensorwise(x, spec, dense=torch.float32)
    big = torch.tensor(torch.finfo(torch.bfloat16).max, device=DEVICE)
    assert_same(got.scales, 1.0 / big)  # enc = the input dtype's max (algorithms.md §2.1)
    assert_same(got.dense, fake_quantize(x, spec))


def test_delayed_uses_the_previous_scale_and_records_the_amax():
    spec = QuantSpec(E4M3, scaling="delayed", history_len=3)
    state = ScalingState(3, device=DEVICE)
    for step, scale in enumerate([10.0, 20.0, 5.0, 5.0]):  # algorithms.md §2.2's example
        x = randn(32, 64, seed=step) * (scale / 4)
        enc = state.scale.clone() / spec.headroom
        want = fake_quantize(x, spec, state=state)  # the reference updates its state
        got = fp8.quantize_tensorwise(x, spec, enc=enc, dense=torch.float32, transpose=True)
        assert_same(got.dense, want, f"step {step}")
        assert_same(got.amax, abs_max(x))
        assert_same(got.codes_t, got.codes.T.contiguous())


@pytest.mark.parametrize("pow2", [True, False])
def test_rowwise_with_column_wise_copy(pow2: bool):
    spec = QuantSpec(E4M3, scaling="row", pow2_scale=pow2)
    x = _operand(2)
    for t in (x, x.T):  # contiguous and a transposed view
        got = fp8.quantize_rowwise(t, spec, colwise=True, dense=torch.float32)
        ref, ref_t = quantize(t, spec), quantize(t.T, spec)
        assert_same(got.codes, ref.codes, "row codes")
        assert_same(got.scales, ref.scales, "row scales")
        assert_same(got.dense, fake_quantize(t, spec), "dequantized")
        assert_same(got.codes_t, ref_t.codes, "column-wise codes")
        assert_same(got.scales_t, ref_t.scales, "column-wise scales")


def test_stochastic_rounding_equals_the_bits_reference():
    spec = QuantSpec(E5M2, rounding="stochastic")
    x = _operand(3)
    got = fp8.quantize_tensorwise(x, spec, dense=torch.float32, seed=99)
    bits = philox_bits(99, torch.arange(x.numel())).reshape(x.shape)
    assert_same(got.dense.cpu(), fake_quantize_with_bits(x.cpu(), spec, bits))
    with pytest.raises(ValueError, match="needs a seed"):
        fp8.quantize_tensorwise(x, spec)


def test_non_finite_inputs_as_the_reference():
    x = _operand(4)
    x[3, 3], x[4, 4], x[5, 5] = float("inf"), -float("inf"), float("nan")
    for fmt in (E5M2, E4M3, "fp6_e2m3"):  # specials: +-Inf and NaN / NaN only / none
        spec = QuantSpec(fmt)
        got = fp8.quantize_tensorwise(x, spec, dense=torch.float32)
        assert_same(got.dense, fake_quantize(x, spec), f"{fmt} tensorwise")
        assert_same(got.scales, quantize(x, spec).scales, f"{fmt} scale")
        spec = QuantSpec(fmt, scaling="row")
        got = fp8.quantize_rowwise(x, spec, colwise=True, dense=torch.float32)
        assert_same(got.dense, fake_quantize(x, spec), f"{fmt} rowwise")
        assert_same(got.scales_t, quantize(x.T, spec).scales, f"{fmt} column-wise scales")
    # delayed scaling: the scale is used, the non-finite amax is reported, not hidden
    spec = QuantSpec(E4M3, scaling="delayed")
    got = fp8.quantize_tensorwise(x, spec, enc=torch.tensor(2.0), dense=torch.float32)
    assert bool(got.amax.isnan()) and bool(got.amax_bad)


def test_empty_operands():
    x = torch.empty(0, 64, device=DEVICE)
    got = fp8.quantize_tensorwise(x, QuantSpec(E4M3), transpose=True, dense=torch.float32)
    assert got.codes.shape == (0, 64) and got.codes_t.shape == (64, 0) and got.dense.numel() == 0
    got = fp8.quantize_rowwise(x, QuantSpec(E4M3, scaling="row"), colwise=True)
    assert got.codes.shape == (0, 64) and got.scales_t.shape == (64, 1)
