"""QuantizedLinear (lptrain/qat/quantized.py): storage formats against lptrain.numerics,
bytes per parameter, the frozen GEMM's backward vs autograd in float64, state_dict round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import lptrain.nn.chunked as chunked
from lptrain.numerics import fake_quantize
from lptrain.qat import QuantizedLinear
from lptrain.qat.quantized import FP8_SPEC, NVFP4_SPEC


@pytest.fixture(scope="module")
def w():
    return torch.randn(48, 128, generator=torch.Generator().manual_seed(0)) * 0.05


def test_float_formats_equal_numerics_fake_quantize(w):
    assert torch.equal(
        QuantizedLinear.from_weight(w, "fp8").dequantize(), fake_quantize(w, FP8_SPEC)
    )
    nv = QuantizedLinear.from_weight(w, "nvfp4").dequantize()
    assert torch.equal(nv, fake_quantize(w, NVFP4_SPEC))
    assert torch.equal(
        QuantizedLinear.from_weight(w, "bf16").dequantize(), w.to(torch.bfloat16).float()
    )


@pytest.mark.parametrize("fmt,bits,group", [("int8", 8, 128), ("int4", 4, 32)])
def test_int_formats_symmetric_groups(w, fmt, bits, group):
    q = QuantizedLinear.from_weight(w, fmt, group_size=group)
    p = 2 ** (bits - 1) - 1
    wg = w.double().reshape(48, -1, group)
    s = wg.abs().amax(-1, keepdim=True) / p
    ref = (torch.round(wg / s).clamp(-p, p) * s).reshape(w.shape)
    torch.testing.assert_close(q.dequantize().double(), ref, rtol=1e-6, atol=1e-7)
    codes = q.integer_codes()
    assert codes.abs().max() <= p and q.step.shape == (48, 128 // group)


def test_bytes_per_param(w):
    big = torch.randn(256, 1024) * 0.02
    got = {f: QuantizedLinear.from_weight(big, f).bytes_per_param() for f in
           ("bf16", "fp8", "int8", "int4", "nvfp4", "nf4")}  # fmt: skip
    assert got["bf16"] == 2.0
    assert got["fp8"] == got["int8"] == pytest.approx(1 + 4 / 1024)
    assert got["int4"] == pytest.approx(0.5 + 4 / 64) and got["int4"] <= 0.6  # group 64
    assert got["nvfp4"] == pytest.approx(0.5 + 1 / 16 + 4 / big.numel())
    # nf4: codes, an 8-bit absmax per 64, an fp32 absmax per 256 of those, one fp32 offset
    assert got["nf4"] == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256) + 4 / big.numel())
    assert 8 * got["nf4"] == pytest.approx(4.127, abs=1e-3)  # QLoRA's 4.127 bits per weight


@pytest.mark.parametrize("fmt", ["fp8", "int4", "nvfp4", "bf16", "nf4"])
@pytest.mark.parametrize("chunk_elems", [None, 256], ids=["one-chunk", "chunks"])
def test_frozen_gemm_backward_equals_autograd_float64(w, fmt, chunk_elems, monkeypatch):
    if chunk_elems:
        monkeypatch.setattr(chunked, "CHUNK_ELEMS", chunk_elems)
    bias = torch.randn(48)
    q = QuantizedLinear.from_weight(w, fmt, bias=bias, group_size=32)
    x = torch.randn(2, 7, 128, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 7, 48, dtype=torch.float64)
    y = q(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    ref = torch.nn.functional.linear(x, q.dequantize().double(), bias.double())
    (dx_ref,) = torch.autograd.grad(ref, x, dy)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fmt", ["nvfp4", "nf4"])
def test_state_dict_is_tensors_and_safetensors_round_trip(tmp_path, w, fmt):
    q = QuantizedLinear.from_weight(w, fmt, bias=torch.ones(48))
    path = tmp_path / "q.safetensors"
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(path))
    fresh = QuantizedLinear.from_weight(torch.zeros_like(w), fmt, bias=torch.zeros(48))
    fresh.load_state_dict(load_file(str(path)))
    x = torch.randn(5, 128)
    assert torch.equal(fresh(x), q(x))


def test_house_rules(w):
    q = QuantizedLinear.from_weight(w, "int4")
    assert q(torch.zeros(0, 128)).shape == (0, 48)
    x = torch.zeros(1, 128)
    x[0, 0] = float("nan")
    assert torch.isnan(q(x)).all()
    with pytest.raises(ValueError, match=r"expected input with last dim 128, got shape \(3, 64\)"):
        q(torch.zeros(3, 64))
    with pytest.raises(ValueError, match="group_size: 48 does not divide in_features 128"):
        QuantizedLinear.from_weight(w, "int4", group_size=48)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n_of", ["signed", "symmetric"])
def test_affine_codes_are_packed_at_their_bit_width(bits, n_of):
    """b-bit codes take ceil(in·b/8) bytes per row (int8 at 8 bits), odd widths included, and
    come back exactly, the grid's edges too; the dequantized weight is unchanged by packing."""
    n = -(2 ** (bits - 1)) if n_of == "signed" else -(2 ** (bits - 1)) + 1
    gen = torch.Generator().manual_seed(bits)
    out_f, in_f = 5, 37
    q = torch.randint(n, 2 ** (bits - 1), (out_f, in_f), generator=gen, dtype=torch.int16)
    q[0, 0], q[-1, -1] = n, 2 ** (bits - 1) - 1
    step = torch.rand(out_f, 1, generator=gen) + 0.1
    m = QuantizedLinear(in_f, out_f, "affine")
    m.set_affine(q, step, None, bits=bits, group_size=in_f, n=n)
    assert m.code_bits == bits
    row_bytes = -(-in_f * bits // 8)  # ceil(37·b/8)
    assert m.codes.shape == (out_f, row_bytes)
    assert m.codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(m.integer_codes(), q)
    assert torch.equal(m.weight_rows(2, 4), q[2:4].float() * step[2:4])
    assert m.stored_bytes() == out_f * row_bytes + 4 * out_f  # codes + steps


def test_nf4_rows_are_the_whole_weight_and_shapes_are_checked(w):
    """A row chunk decodes its own scales (its first group's place among the 256-blocks): every
    split equals the whole, which is bitsandbytes' (tests/numerics/test_nf4.py)."""
    q = QuantizedLinear.from_weight(torch.randn(96, 128), "nf4", group_size=32)  # 384 scales
    whole = q.dequantize()
    assert q.scale_absmax.shape == (2,) and q.scale_codes.shape == (96, 4)
    assert torch.equal(torch.cat([q.weight_rows(0, 7), q.weight_rows(7, 96)]), whole)
    with pytest.raises(ValueError, match="group_size: nf4 needs an even in_features that 48"):
        QuantizedLinear.from_weight(w, "nf4", group_size=48)
    with pytest.raises(ValueError, match="nf4 needs an even in_features that 1 divides, got 5"):
        QuantizedLinear.from_weight(torch.randn(4, 5), "nf4", group_size=1)
