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


# ---------------------------------------------------------------- merging (numerics/stats.py)

MX4 = QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="e8m0")


def _halves_and_whole(spec):
    """Statistics of two row halves and of the whole tensor. The halves have different scales
    of magnitude, zeros and a block whose E8M0 scale clamps, so every weighting matters."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g)
    x[:3] *= 50.0  # rows of the first half are larger
    x[5, :40] = 0.0  # zeros only in the second half (underflow's denominator)
    x[6, :32] = 1e-39  # a block below E8M0's range: its scale clamps
    return _stats(x[:3], spec), _stats(x[3:], spec), _stats(x, spec)


@pytest.mark.parametrize("spec", [MX4, QuantSpec("fp8_e4m3", scaling="row")])
def test_merged_halves_equal_the_whole(spec):
    # Row- and row-block scaling: each row quantizes on its own, so splitting rows (as
    # micro-batches and ranks split tokens) must not change a merged statistic.
    from lptrain.numerics.stats import merge_stats

    a, b, whole = _halves_and_whole(spec)
    merged = merge_stats(a, b)
    for key in ("amax", "scale_min", "scale_max", "elements", "nonzero", "groups"):
        assert merged[key] == whole[key], key
    # Fractions come as FP32 ratios: merged through counts they agree to FP32 rounding.
    for key in ("saturated", "nonfinite", "underflow", "clamped", "dynamic_range"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-6), key
    assert merged["sqnr_db"] == pytest.approx(whole["sqnr_db"], abs=1e-4)
    assert merged["rms"] == pytest.approx(whole["rms"], rel=1e-6)
    assert merged["scale_mean"] == pytest.approx(whole["scale_mean"], rel=1e-6)
    if spec is MX4:  # the weighting is visible: a plain mean of the halves is off
        assert (
            whole["clamped"] > 0
            and abs((a["clamped"] + b["clamped"]) / 2 - whole["clamped"]) > 0.01
        )
        assert abs((a["sqnr_db"] + b["sqnr_db"]) / 2 - whole["sqnr_db"]) > 0.01


def test_merging_empty_and_counter_entries():
    from lptrain.numerics.stats import QuantStats, merge_stats

    a, _, _ = _halves_and_whole(MX4)
    assert merge_stats(a, QuantStats.empty_dict()) == pytest.approx(a)
    assert merge_stats(QuantStats.empty_dict(), QuantStats.empty_dict())["elements"] == 0
    # The INT32 accumulator's entries are counts: they add.
    acc = merge_stats({"int32_overflows": 2.0, "chunk_sums": 10.0}, {"int32_overflows": 1.0})
    assert acc == {"int32_overflows": 3.0, "chunk_sums": 10.0}


def test_moments_and_blockwise_range_against_float64():
    # min/max/mean/std over the finite elements, and the blockwise dynamic range over
    # 32-element blocks along the quantizer's axis, against numpy float64 on the same tensor.
    import numpy as np

    from lptrain.numerics.formats import get_format
    from lptrain.numerics.stats import format_range_bits

    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 80, generator=g) * 0.5 + 0.3  # rows of 2.5 blocks: a short last block
    x[1, :32] *= torch.logspace(-12, 0, 32)  # one block spans 40 bits
    x[2, 32:64] = 0.0  # a block of zeros has no range and does not count
    x[3, 5] = 1e-3  # a 10-bit block: within E4M3's 17.8, beyond E2M1's 3.6
    ref = x.double().numpy()
    blocks = np.pad(np.abs(ref), ((0, 0), (0, 16))).reshape(-1, 32)
    live = blocks.max(1) > 0
    bits = np.array([np.log2(b.max() / b[b > 0].min()) for b in blocks[live]])
    for fmt, spec in [
        ("fp8_e4m3", QuantSpec("fp8_e4m3")),  # per-tensor: rows of the tensor itself
        ("fp4_e2m1", QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3")),
    ]:
        s = _stats(x, spec)
        assert s["min"] == ref.min() and s["max"] == ref.max()
        assert s["mean"] == pytest.approx(ref.mean(), rel=1e-6)
        assert s["std"] == pytest.approx(ref.std(), rel=1e-6)
        assert s["block_dynamic_range"] == pytest.approx(bits.max(), rel=1e-6)
        limit = format_range_bits(get_format(fmt))
        assert s["blocks"] == live.sum() == 6 * 3 - 1
        assert s["block_range_exceeded"] == pytest.approx((bits > limit).mean(), rel=1e-6)
    assert format_range_bits(get_format("fp8_e4m3")) == pytest.approx(math.log2(448 / 2**-9))


def test_moments_merge_and_nonfinite():
    from lptrain.numerics.stats import merge_stats

    a, b, whole = _halves_and_whole(MX4)
    merged = merge_stats(a, b)
    for key in ("min", "max", "block_dynamic_range", "blocks"):
        assert merged[key] == whole[key], key
    for key in ("mean", "std", "block_range_exceeded"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-6), key
    x = torch.tensor([[1.0, -2.0, float("nan"), 4.0]])
    s = _stats(x, QuantSpec("fp8_e4m3"))  # the finite elements, averaged over all four
    assert (s["min"], s["max"], s["mean"]) == (-2.0, 4.0, 3.0 / 4)


def test_one_sqnr_formula_for_operands_and_optimizer_moments():
    """`sqnr_db` is the formula behind the operands' SQNR (per call and merged) and the stored
    Adam moments' (optim/states.py): +inf when nothing was lost, NaN for a non-finite error."""
    from lptrain.numerics.stats import from_moments, sqnr_db, to_moments
    from lptrain.optim.states import quantization_metrics

    assert sqnr_db(100.0, 1.0) == 20.0
    assert sqnr_db(5.0, 0.0) == math.inf
    assert math.isnan(sqnr_db(5.0, math.nan)) and math.isnan(sqnr_db(5.0, math.inf))
    sums = torch.tensor([3.0, 0.01, 10.0, 1.0], dtype=torch.float64)
    assert quantization_metrics(sums) == (sqnr_db(3.0, 0.01), 0.1)
    s = _stats(torch.randn(64, generator=torch.Generator().manual_seed(0)), QuantSpec("fp8_e4m3"))
    m = to_moments(s)
    assert from_moments(m)["sqnr_db"] == sqnr_db(m["signal"], m["error"])
    # a NaN error (a NaN in the dequantized values) stays NaN through the merge (was +inf)
    assert math.isnan(from_moments({**m, "error": math.nan})["sqnr_db"])


@pytest.mark.parametrize("spec", [QuantSpec("fp8_e4m3"), MX4])
def test_opt_in_statistics_are_computed_only_when_listed(spec, monkeypatch):
    """Of min/max/mean/std and the blockwise range only the listed group is computed (its
    passes run, the other's do not; unlisted values are NaN); every value that is computed is
    the one computing everything gives, to the bit."""
    from lptrain.numerics import stats as st

    calls = []
    blocks = st._block_ranges
    monkeypatch.setattr(st, "_block_ranges", lambda *a: calls.append(1) or blocks(*a))
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))

    def stats(wanted):
        return fake_quantize(x, spec, with_stats=True, wanted=wanted)[1]["stats"].as_dict()

    full = stats(st.OPTIONAL)
    assert len(calls) == 1
    for wanted, computed in [(("amax", "sqnr_db"), ()), (("std",), st.SIGNED),
                             (("block_range_exceeded",), st.BLOCKWISE)]:  # fmt: skip
        calls.clear()
        got = stats(wanted)
        assert len(calls) == (computed == st.BLOCKWISE)
        for key, value in full.items():
            if key in st.OPTIONAL and key not in computed or key == "blocks" and not calls:
                assert math.isnan(got[key]), key
            else:
                assert got[key] == value, key


def test_a_statistics_window_computes_only_the_statistics_it_is_given(monkeypatch):
    """The monitoring's window (nn/observe.py `stats_window`, which the runner hands the
    statistics due this step) reaches every quantization of the layer's three GEMMs."""
    from lptrain.nn import Linear, stats_window
    from lptrain.numerics import stats as st

    calls = []
    blocks = st._block_ranges
    monkeypatch.setattr(st, "_block_ranges", lambda *a: calls.append(1) or blocks(*a))
    layer = Linear(64, 64, bias=False, recipe="mxfp4", backend="emulated", seed=0)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with stats_window({"l": layer}, wanted=("amax", "sqnr_db", "min")) as out:
        layer(x).square().mean().backward()
    assert not calls and out["l"]
    for d in out["l"].values():
        assert math.isfinite(d["min"]) and math.isnan(d["block_dynamic_range"])
    with stats_window({"l": layer}) as out:  # no list: everything, as before
        layer(x).square().mean().backward()
    assert calls and all(math.isfinite(d["block_dynamic_range"]) for d in out["l"].values())
