"""Quantization statistics (numerics/stats.py) on tensors with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from lptrain.numerics import QuantSpec, fake_quantize


def _stats(x, spec):
    return fake_quantize(x, spec, with_stats=True)[1]["stats"].as_dict()


def test_saturation_underflow_and_sqnr_on_known_tensors():
    # E4M3 without scaling: 3 of 8 values above 448 saturate, 2 below half the smallest
    # subnormal (2^-10) flush to zero, the rest are exact grid values.
    x = torch.tensor([500.0, -600.0, 1000.0, 1e-4, -2e-4, 1.0, 2.0, 0.0])
    s = _stats(x, QuantSpec("fp8_e4m3", scaling="none"))
    assert s["saturated"] == 3 / 8
    assert s["underflow"] == pytest.approx(2 / 7)  # of the non-zero inputs (float32)
    xh = torch.tensor([448.0, -448.0, 448.0, 0, 0, 1.0, 2.0, 0.0])
    want = 10 * math.log10(float(x.double().square().sum() / (x - xh).double().square().sum()))
    assert s["sqnr_db"] == pytest.approx(want, abs=1e-3)
    assert s["dynamic_range"] == pytest.approx(math.log2(1000 / 1e-4), rel=1e-6)
    assert s["elements"] == 8 and s["nonfinite"] == 0 and s["amax"] == 1000.0


def test_clamped_blocks_and_scale_range():
    # MX E8M0: a block whose amax is below 2^-127 * 6 clamps its exponent at -127.
    x = torch.ones(4, 32)
    x[1] = 1e-38
    s = _stats(x, QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="e8m0"))
    assert s["clamped"] == 1 / 4 and s["scale_min"] == 2.0**-127 and s["scale_max"] == 0.25
    # NVFP4: a block 1e-7 below the tensor max rounds its UE4M3 scale to zero (underflow).
    y = torch.ones(2, 16)
    y[1] = 1e-7
    nv = QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3")
    assert _stats(y, nv)["clamped"] == 1 / 2
    assert _stats(torch.ones(2, 16), nv)["clamped"] == 0.0


def test_nonfinite_fraction_and_finite_only_norms():
    x = torch.full((4, 8), 1.1)  # off the E5M2 grid (scale 1 for a non-finite amax, TE)
    x[0, 0] = float("inf")
    s = _stats(x, QuantSpec("fp8_e5m2"))
    assert s["nonfinite"] == 1 / 32 and s["amax"] == pytest.approx(1.1)
    # SQNR over the finite elements: 1.1 -> 1.0 (E5M2 spacing 0.25 at 1)
    assert s["sqnr_db"] == pytest.approx(10 * math.log10(1.1**2 / 0.1**2), abs=1e-3)
