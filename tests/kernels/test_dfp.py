"""kernels/dfp.py against lptrain.numerics.dfp_quantize: mantissas and exponent bit for bit
(round to nearest, the 2^15 saturation edge, zeros, strided operands), stochastic rounding
against the bits-fed reference, the reference's refusal of NaN/Inf, far exponents."""

from __future__ import annotations

import pytest
import torch

from lptrain.kernels.dfp import quantize_dfp
from lptrain.kernels.reference import philox_bits, round_with_bits
from lptrain.numerics import dfp_quantize

from .conftest import DEVICE, randn


@pytest.mark.parametrize("bits", [16, 8])
def test_nearest_is_the_reference(bits: int):
    x = randn(64, 96, seed=1, scale=1e-3)
    x[0, 0] = 2.0**-7 * (1 - 2**-20)  # amax just below a power of two: saturates at 2^15 - 1
    x[1] = 0.0
    for t in (x, x.T):
        got, want = quantize_dfp(t, bits=bits), dfp_quantize(t, bits=bits)
        assert torch.equal(got.mantissa, want.mantissa) and torch.equal(got.exponent, want.exponent)
    zero = torch.zeros(8, 8, device=DEVICE)
    assert int(quantize_dfp(zero).exponent) == 0 and not quantize_dfp(zero).mantissa.any()


def test_stochastic_is_the_bits_reference():
    x = randn(32, 64, seed=2)
    got = quantize_dfp(x, rounding="stochastic", seed=31)
    e = dfp_quantize(x).exponent
    bits = philox_bits(31, torch.arange(x.numel())).reshape(x.shape)
    want = round_with_bits(torch.ldexp(x.cpu(), -e.cpu()), "int16", bits).to(torch.int16)
    assert torch.equal(got.exponent.cpu(), e.cpu()) and torch.equal(got.mantissa.cpu(), want)


def test_non_finite_and_far_exponents():
    x = randn(8, 16, seed=3)
    x[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_dfp(x)
    tiny = randn(8, 16, seed=4, scale=1e-36)  # 2^-E above FP32's range: the reference's path
    got, want = quantize_dfp(tiny), dfp_quantize(tiny)
    assert torch.equal(got.mantissa, want.mantissa) and torch.equal(got.exponent, want.exponent)
