"""Bad input: clear errors or documented results, never silent garbage."""

from __future__ import annotations

import math

import pytest
import torch

from lptrain.numerics import (
    QuantSpec,
    dfp_quantize,
    fake_quantize,
    format_names,
    get_format,
    hadamard,
    quantize,
    round_to_format,
)


def test_unknown_format_lists_known_ones():
    with pytest.raises(ValueError) as e:
        get_format("fp7_e3m3")
    msg = str(e.value)
    assert "fp7_e3m3" in msg
    for name in format_names():
        assert name in msg
    assert "eXmY" in msg
    with pytest.raises(ValueError, match="known formats"):
        round_to_format(torch.ones(2), "bf17")
    with pytest.raises(ValueError, match="format"):
        QuantSpec("nope")
    with pytest.raises(ValueError, match="eXmY"):
        get_format("e9m2")


@pytest.mark.parametrize(
    "dtype",
    [torch.int32, torch.int64, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.complex64],
)
def test_non_floating_tensors_rejected(dtype):
    x = torch.ones(4, 32).to(dtype)
    for call in (
        lambda: round_to_format(x, "fp8_e4m3"),
        lambda: quantize(x, QuantSpec("fp8_e4m3")),
        lambda: fake_quantize(x, QuantSpec("fp4_e2m1", scaling="none")),
        lambda: hadamard(x, 32),
        lambda: dfp_quantize(x),
    ):
        with pytest.raises(TypeError, match="float"):
            call()
    with pytest.raises(TypeError):
        round_to_format([1.0, 2.0], "fp8_e4m3")


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


@pytest.mark.parametrize(
    "kwargs,fields",
    [
        (dict(scaling="tensor", block_size=32), ["block_size", "scaling"]),
        (dict(scaling="block"), ["scaling", "block_size"]),
        (dict(scaling="block", block_size=0), ["block_size"]),
        (dict(scaling="block", block_size=(16, 0)), ["block_size"]),
        (dict(scaling="tensor", scale_format="e8m0"), ["scale_format", "scaling"]),
        (
            dict(scaling="block", block_size=32, scale_format="e8m0", pow2_scale=True),
            ["pow2_scale", "scale_format"],
        ),
        (dict(hadamard_signs=True), ["hadamard_signs", "hadamard"]),
        (dict(hadamard=24), ["hadamard"]),
        (dict(scaling="fancy"), ["scaling"]),
        (dict(scale_format="bf16"), ["scale_format"]),
        (dict(rounding="up"), ["rounding"]),
        (dict(scale_rounding="nearest"), ["scale_rounding"]),
        (dict(amax_algo="mean"), ["amax_algo"]),
        (dict(scaling="delayed", history_len=0), ["history_len"]),
        (dict(amax_refresh=50), ["amax_refresh"]),
        (dict(format="e8m0"), ["format"]),
        (
            dict(format="int8", scaling="block", block_size=16, scale_format="ue4m3"),
            ["scale_format"],
        ),
        (dict(scale_from="std"), ["scale_from"]),
        (dict(headroom=0.5), ["headroom"]),
    ],
)
def test_inconsistent_spec_names_the_fields(kwargs, fields):
    with pytest.raises(ValueError) as e:
        QuantSpec(**kwargs)
    for f in fields:
        assert f in str(e.value), (f, str(e.value))


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
