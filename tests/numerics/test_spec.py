"""QuantSpec validation (numerics/spec.py): every inconsistent combination is refused with a
message naming the field."""

from __future__ import annotations

import pytest

from lptrain.numerics import QuantSpec, SpecError


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


@pytest.mark.parametrize(
    "kwargs, start",
    [
        (dict(history_len="16", scaling="delayed"), "history_len: expected int, got str '16'"),
        (dict(pow2_scale=1), "pow2_scale: expected bool, got int 1"),
        (dict(hadamard=True), "hadamard: expected int or null, got bool True"),
        (dict(history_len=16), "history_len: applies to scaling='delayed' only"),
        (dict(margin=1), "margin: applies to scaling='delayed' only"),
        (dict(delayed_init="current"), "delayed_init: applies to scaling='delayed' only"),
        (
            dict(scaling="block", block_size=32, scale_format="e8m0", scale_target=448.0),
            "scale_target: applies to two-level scale formats",
        ),
        (dict(clip_sigmas=3.0), "clip_sigmas: applies to scale_from='std' only"),
        (
            dict(scale_rounding="ceil"),
            "scale_rounding: 'ceil' means nothing for scale_format='fp32'",
        ),
        (
            dict(scaling="block", block_size=16, scale_format="ue4m3", scale_rounding="floor"),
            "scale_rounding: 'floor' is not one of ('nearest', 'ceil')",
        ),
        (dict(scaling="none", headroom=2.0), "headroom: scaling='none' has no scale"),
        (dict(scaling="delayed", pow2_scale=True), "pow2_scale: applies to fp32 current scales"),
    ],
)
def test_types_and_meaningless_fields_are_refused_with_the_field_name(kwargs, start):
    with pytest.raises(SpecError) as e:
        QuantSpec(**kwargs)
    assert str(e.value).startswith(start), str(e.value)
    assert e.value.field == start.split(":")[0]


def test_format_defaults_for_block_scale_rounding():
    mx = QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="e8m0")
    nv = QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3")
    assert mx.block_scale_rounding == "floor" and nv.block_scale_rounding == "nearest"
    assert QuantSpec("fp8_e4m3").block_scale_rounding is None
