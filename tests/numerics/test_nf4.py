"""NF4 with double-quantized scales (lptrain/numerics/nf4.py): the code table against QLoRA's
construction and bitsandbytes' table, storage and dequantization bit-equal to bitsandbytes'
CPU path, the first level against a nearest-value reference, non-finite weights, SQNR."""

from __future__ import annotations

import logging

import pytest
import torch

from lptrain.numerics import nf4


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, imported offline: on import it looks for an optional CPU kernel on the
    Hugging Face Hub (and logs that it found none)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return pytest.importorskip("bitsandbytes.functional")


def _weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 0.1


def test_table_is_qlora_normal_quantiles():
    """QLoRA §3 (bitsandbytes `create_normal_map(0.9677083)`): 8 positive and 7 negative
    quantiles of N(0, 1) at equal spacing from 0.9677083 to 0.5, a zero, scaled to [-1, 1]."""
    ppf = torch.special.ndtri
    pos = ppf(torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -ppf(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1])
    ref = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    ref = ref / ref.max()
    torch.testing.assert_close(nf4.NF4.double(), ref, rtol=0, atol=1e-6)
    assert nf4.NF4[7] == 0 and nf4.NF4[0] == -1 and nf4.NF4[15] == 1


def test_tables_bit_equal_bitsandbytes(bnb):
    assert torch.equal(nf4.NF4, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), bnb.create_dynamic_map())


@pytest.mark.parametrize(
    "shape,block",
    [((64, 64), 64), ((320, 64), 64), ((96, 128), 32), ((256, 1024), 64)],
    ids=["one-partial-scale-block", "full-and-partial", "block32", "16-scale-blocks"],
)
def test_storage_and_dequantization_bit_equal_bitsandbytes(bnb, shape, block):
    """quantize_4bit(nf4, compress_statistics=True) + dequantize_4bit on CPU: the same NF4
    indices, 8-bit scale codes, fp32 absmax per 256 scales, offset and dequantized weight."""
    w = _weight(shape, sum(shape))
    packed, st = bnb.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=True)
    idx, absmax = nf4.quantize(w, block)
    codes, block_absmax, offset = nf4.quantize_scales(absmax)
    bnb_idx = torch.stack((packed.flatten() >> 4, packed.flatten() & 0xF), -1).flatten()
    assert torch.equal(idx.flatten(), bnb_idx)  # bitsandbytes packs the high nibble first
    assert torch.equal(codes, st.absmax) and torch.equal(block_absmax, st.state2.absmax)
    assert torch.equal(offset, st.offset)
    got = nf4.dequantize(idx, nf4.dequantize_scales(codes, block_absmax, offset), block)
    assert torch.equal(got, bnb.dequantize_4bit(packed, st))


def test_first_level_is_the_nearest_value_and_ties_go_down():
    w = _weight((32, 64), 3)
    idx, absmax = nf4.quantize(w, 64)
    x = (w.double().reshape(-1, 64) / absmax.double().unsqueeze(-1)).reshape(-1, 1)
    assert torch.equal(idx.flatten().long(), (x - nf4.NF4.double()).abs().argmin(-1))
    mids = (nf4.NF4[:-1] + nf4.NF4[1:]) / 2  # exactly between two values: the lower one
    tie = torch.cat([torch.ones(1), mids, torch.zeros(64 - 16)])
    assert torch.equal(nf4.quantize(tie, 64)[0][1:16].long(), torch.arange(15))


def test_scale_codes_decode_near_the_absmax():
    """On N(0, 1) weights each decoded scale lies within 0.8% of its fp32 absmax (measured
    0.76%). The error is relative to the largest |absmax - mean| of its 256: a block far
    smaller than its neighbours loses more (bitsandbytes alike)."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(6))
    _, absmax = nf4.quantize(w, 64)
    back = nf4.dequantize_scales(*nf4.quantize_scales(absmax))
    assert ((back - absmax).abs() / absmax).max() < 0.008


def test_non_finite_weights_stay_non_finite():
    for bad in (float("nan"), float("inf")):
        w = _weight((4, 64), 5)
        w[1, 3] = bad
        idx, absmax = nf4.quantize(w, 64)
        out = nf4.dequantize(idx, nf4.dequantize_scales(*nf4.quantize_scales(absmax)), 64)
        assert not torch.isfinite(out).any()


def test_sqnr_on_gaussian_weights():
    """NF4 is built for normal weights (QLoRA §3): on N(0, 1) at block 64 it beats a symmetric
    int4 grid with an fp32 step per 64 (20.74 vs 19.34 dB) although its scales are 8-bit
    codes, which cost 0.002 dB here (20.743 with the fp32 absmax)."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(6))
    idx, absmax = nf4.quantize(w, 64)
    got = nf4.dequantize(idx, nf4.dequantize_scales(*nf4.quantize_scales(absmax)), 64)
    exact_scales = nf4.dequantize(idx, absmax, 64)
    wg = w.reshape(-1, 64)
    s = wg.abs().amax(-1, keepdim=True) / 7
    int4 = (torch.round(wg / s).clamp(-7, 7) * s).reshape(w.shape)

    def sqnr(a):
        return 10 * torch.log10(w.double().square().sum() / (w - a).double().square().sum())

    assert float(sqnr(got)) == pytest.approx(20.741, abs=5e-4)
    assert float(sqnr(exact_scales)) == pytest.approx(20.743, abs=5e-4)
    assert float(sqnr(int4)) == pytest.approx(19.344, abs=5e-4)
