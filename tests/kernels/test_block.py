"""kernels/block.py against lptrain.numerics.quantize / fake_quantize, bit for bit: every block
spec of the named recipes (fp8-block, MXFP8/6/4, MXINT8, NVFP4 with 16x16 weight tiles and the
random Hadamard, UE5M3, Quartet's std scales), scale-rule variants, zero/tiny/huge blocks;
stochastic rounding against the bits-fed reference and unbiased in distribution; non-finite
inputs; empty operands."""

from __future__ import annotations

import pytest
import torch

from lptrain import recipes
from lptrain.kernels.block import quantize_block
from lptrain.kernels.reference import fake_quantize_with_bits, philox_bits
from lptrain.numerics import TE_NVFP4_SIGNS, QuantSpec, fake_quantize, quantize

from .conftest import DEVICE, assert_same, randn


def _recipe_specs(rounding: str) -> dict[str, QuantSpec]:
    out = {}
    for name in ("fp8-block", "mxfp8", "mxfp6", "mxfp4", "mxint8", "nvfp4", "fp4-ue5m3", "quartet"):
        r = recipes.get(name)
        for g in ("output", "grad_input", "grad_weight"):
            for s in (r.gemm(g).a, r.gemm(g).b):
                if s.rounding == rounding and s.scaling == "block":
                    out.setdefault(f"{name}:{s.format}:{s.block_size}:{s.hadamard}", s)
    return out


RNE = _recipe_specs("nearest")
SR = _recipe_specs("stochastic")
VARIANTS = {
    "e8m0-ceil": QuantSpec("fp8_e4m3", scaling="block", block_size=32, scale_format="e8m0",
                           scale_rounding="ceil"),
    "fp32-headroom": QuantSpec("fp8_e5m2", scaling="block", block_size=64, headroom=1.5),
    "ue5m3-target": QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="ue5m3",
                              scale_target=2048.0),
    "e8m0-had128": QuantSpec("fp6_e3m2", scaling="block", block_size=32, scale_format="e8m0",
                             hadamard=128, hadamard_signs=True),
    "e8m0-tile": QuantSpec("fp4_e2m1", scaling="block", block_size=(32, 32), scale_format="e8m0"),
}  # fmt: skip


def _signs(spec: QuantSpec) -> torch.Tensor | None:
    if not spec.hadamard_signs:
        return None
    if spec.hadamard == 16:
        return torch.tensor(TE_NVFP4_SIGNS, dtype=torch.float32, device=DEVICE)
    g = torch.Generator().manual_seed(spec.hadamard)
    return (torch.randint(0, 2, (spec.hadamard,), generator=g) * 2 - 1).float().to(DEVICE)


def _operand(seed: int = 0) -> torch.Tensor:
    """128 x 256 with a zero, a tiny, a huge and a wide-range block row among Gaussian ones."""
    x = randn(128, 256, seed=seed, scale=2.0)
    x[1] = 0.0
    x[2] *= 1e-33
    x[3] *= 1e30
    x[4] = x[4] * torch.logspace(-20, 20, 256, device=DEVICE)
    return x


def _codes(qt) -> torch.Tensor:
    fp8 = qt.codes.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    return qt.codes.view(torch.uint8) if fp8 else qt.codes


@pytest.mark.parametrize("spec", [*RNE.values(), *VARIANTS.values()],
                         ids=[*RNE, *VARIANTS])  # fmt: skip
def test_round_to_nearest_is_the_reference(spec: QuantSpec):
    x = _operand()
    signs = _signs(spec)
    got = quantize_block(x, spec, signs=signs, dense=torch.float32, mask=True)
    ref = quantize(x, spec, signs=signs)
    want, extras = fake_quantize(x, spec, signs=signs, with_mask=True)
    assert_same(got.codes, _codes(ref).reshape(got.codes.shape), "codes")
    assert_same(got.scales, ref.scales.reshape(got.scales.shape), "block scales")
    if spec.two_level:
        assert_same(got.global_scale, ref.global_scale, "tensor scale")
    assert_same(got.dense, want, "dequantized")
    assert torch.equal(got.mask, extras["mask"]), "trust mask"


@pytest.mark.parametrize("spec", SR.values(), ids=list(SR))
def test_stochastic_rounding_is_the_bits_reference(spec: QuantSpec):
    x = _operand(1)
    signs = _signs(spec)
    got = quantize_block(x, spec, signs=signs, seed=2024, dense=torch.float32)
    bits = philox_bits(2024, torch.arange(x.numel())).reshape(x.shape)
    want = fake_quantize_with_bits(
        x.cpu(), spec, bits, signs=None if signs is None else signs.cpu()
    )
    assert_same(got.dense.cpu(), want)
    with pytest.raises(ValueError, match="needs a seed"):
        quantize_block(x, spec, signs=signs)


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4"])
def test_stochastic_rounding_is_unbiased(name: str):
    spec = recipes.get(name).grad_input.a  # grad_output's quantizer
    bs = spec.block_size
    for v in (1.1, 2.9):  # between grid points after scaling (p far from 0 and 1)
        x = torch.full((128, 512), v, device=DEVICE)
        x[:, ::bs] = 4.0  # every block the same scale
        got = quantize_block(x, spec, seed=7, dense=torch.float32, codes=False).dense
        got = got[:, torch.arange(512, device=DEVICE) % bs != 0]
        vals = got.unique()
        assert vals.numel() == 2, vals  # only the two neighbours occur
        lo, hi = float(vals[0]), float(vals[1])
        p = (v - lo) / (hi - lo)
        sigma = (hi - lo) * (p * (1 - p) / got.numel()) ** 0.5
        assert abs(float(got.double().mean()) - v) < 5 * sigma + 1e-6 * v, (name, v)


@pytest.mark.parametrize("spec", [*RNE.values(), VARIANTS["e8m0-ceil"]],
                         ids=[*RNE, "e8m0-ceil"])  # fmt: skip
def test_non_finite_inputs_as_the_reference(spec: QuantSpec):
    x = _operand(2)
    x[10, 5], x[20, 70], x[30, 200] = float("inf"), float("nan"), -float("inf")
    signs = _signs(spec)
    got = quantize_block(x, spec, signs=signs, dense=torch.float32)
    assert_same(got.dense, fake_quantize(x, spec, signs=signs), "dequantized")
    ref = quantize(x, spec, signs=signs)
    assert_same(got.scales, ref.scales.reshape(got.scales.shape), "block scales")
    if spec.two_level:
        assert_same(got.global_scale, ref.global_scale, "tensor scale")
    assert bool(got.dense.isnan().any())  # it reaches the GEMM


def test_two_level_scales_rounded_up():
    for fmt in ("ue4m3", "ue5m3"):
        spec = QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format=fmt,
                         scale_rounding="ceil")  # fmt: skip
        x = _operand(3)
        got = quantize_block(x, spec, dense=torch.float32, mask=True)
        want, extras = fake_quantize(x, spec, with_mask=True)
        assert_same(got.dense, want, fmt)
        assert_same(got.scales, quantize(x, spec).scales.reshape(got.scales.shape), fmt)
        assert torch.equal(got.mask, extras["mask"])


def test_empty_operand():
    spec = recipes.get("nvfp4").output.b  # 16x16 tiles
    got = quantize_block(torch.empty(0, 64, device=DEVICE), spec, dense=torch.float32)
    assert got.codes.shape == (0, 32) and got.scales.shape == (0, 4) and got.dense.shape == (0, 64)


@pytest.mark.parametrize("spec,shape", [
    (QuantSpec("fp8_e4m3", scaling="block", block_size=32), (8, 40)),  # a partial block
    (QuantSpec("fp8_e4m3", scaling="block", block_size=(16, 16)), (8, 32)),  # a partial tile
    (QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3",
               hadamard=32), (4, 48)),  # a partial rotation block
    (QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="e8m0",
               scale_from="std", hadamard=32), (4, 48)),  # Quartet's std scales
])  # fmt: skip
def test_a_shape_the_groups_do_not_divide_raises_as_the_reference(spec: QuantSpec, shape):
    x = randn(*shape, seed=9)
    with pytest.raises(ValueError) as want:
        fake_quantize(x, spec)
    with pytest.raises(ValueError) as got:
        quantize_block(x, spec, dense=torch.float32)
    assert str(got.value) == str(want.value)
