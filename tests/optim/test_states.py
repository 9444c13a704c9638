"""The moments' stored forms (optim/states.py): block codes round-trip exactly, FP32 and FP64
encodes agree, the second moment keeps its small entries, non-finite stays non-finite."""

from __future__ import annotations

import math

import pytest
import torch

from lptrain.optim import states as st

CODECS = {
    "fp8 m": st.STATE_FORMATS["fp8"].m,
    "fp8 v": st.STATE_FORMATS["fp8"].v,
    "int8 m": st.STATE_FORMATS["int8-block"].m,
    "int8 v": st.STATE_FORMATS["int8-block"].v,
}


def _moments(n: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An m and a v spread over four decades, the way a real layer's are."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.logspace(-6, -2, n)[torch.randperm(n, generator=g)]
    m = mag * torch.randn(n, generator=g)
    return m, m * m + mag * mag


@pytest.mark.parametrize("name", CODECS)
def test_decode_of_encode_is_a_fixed_point_and_fp64_agrees(name):
    codec = CODECS[name]
    m, v = _moments()
    x = m if codec.transform == "none" else v
    codes, scales = st.encode(x, codec)
    assert codes.dtype == codec.code_dtype and codes.shape == (1000,)
    blocks = math.ceil(1000 / st.BLOCK)
    assert scales.dtype == torch.float32 and scales.reshape(blocks, -1).shape[1] == codec.per_block
    y = st.decode(codes, scales, codec)
    # On-grid values come back with the same codes (decode is exact, encode idempotent).
    codes2, scales2 = st.encode(y, codec)
    assert torch.equal(scales2, scales)
    assert (codes2 != codes).sum() <= 1  # sqrt(y) of a squared code may sit one ulp off
    # The FP64 reference of the same quantizer: the same FP32 scales, the same codes.
    codes64, scales64 = st.encode(x.double(), codec)
    assert torch.equal(scales64, scales) and torch.equal(codes64, codes)


def test_sqrt_of_v_keeps_small_entries_where_v_itself_would_lose_them():
    _, v = _moments()
    codec = CODECS["int8 v"]
    y = st.decode(*st.encode(v, codec), codec)
    assert bool((y > 0).all())  # a non-zero v never becomes 0 (m / eps would blow up)
    plain = st.Codec("uint8", "none", 255.0)
    lost = (st.decode(*st.encode(v, plain), plain) == 0).float().mean()
    assert lost > 0.5  # most of a block's v sits below amax / 510


@pytest.mark.parametrize("name", CODECS)
def test_a_non_finite_value_makes_its_block_non_finite_and_leaves_others(name):
    codec = CODECS[name]
    m, v = _moments(300)
    x = (m if codec.transform == "none" else v).clone()
    x[5] = float("nan")
    x[200] = float("inf")
    y = st.decode(*st.encode(x, codec), codec)
    assert bool(y[:128].isnan().all()) and not bool(y[128:256].isfinite().any())
    assert bool(y[256:].isfinite().all())


def test_an_all_zero_block_decodes_to_zero():
    for codec in CODECS.values():
        assert torch.equal(st.decode(*st.encode(torch.zeros(130), codec), codec), torch.zeros(130))


def test_bytes_per_param():
    assert st.STATE_FORMATS["fp32"].bytes_per_param() == 8
    assert st.STATE_FORMATS["bf16"].bytes_per_param() == 4
    assert st.STATE_FORMATS["int8-block"].bytes_per_param() == 2 + 8 / 128
    assert st.STATE_FORMATS["fp8"].bytes_per_param() == 2 + 12 / 128  # v: max and k per block


def test_fp8_first_moment_equals_torchao_fp8_optimizer_state_bit_for_bit():
    # torchao's AdamWFp8 stores a moment as E4M3 codes of x / (absmax / 448) per block: our m
    # codec is that arithmetic (v differs: torchao stores v itself, we expand it, §10).
    subclass_fp8 = pytest.importorskip("torchao.optim.subclass_fp8")
    m, _ = _moments(128 * 8)
    codec = st.STATE_FORMATS["fp8"].m
    codes, scales = st.encode(m, codec)
    theirs, their_scales = subclass_fp8.quantize_fp8(m, block_size=st.BLOCK)
    assert torch.equal(codes, theirs.view(torch.uint8)) and torch.equal(scales, their_scales)
