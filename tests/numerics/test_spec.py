"""QuantSpec validation (numerics/spec.py): every inconsistent combination is refused with a
message naming the field."""

from __future__ import annotations

import pytest

from lptrain.numerics import QuantSpec


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
