"""kernels/reference.py: the Philox twin equals tl.randint; stochastic rounding fed explicit
bits is the reference's rule (bit for bit where the reference's own bits can be fed, unbiased
where they cannot); fake_quantize_with_bits is fake_quantize when it rounds to nearest."""

from __future__ import annotations

import pytest
import torch

from lptrain.kernels.reference import fake_quantize_with_bits, philox_bits, round_with_bits
from lptrain.numerics import QuantSpec, fake_quantize, get_format, round_to_format

from .conftest import DEVICE, assert_same, randn

FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]


def test_philox_twin_equals_triton_randint():
    import triton
    import triton.language as tl

    @triton.jit
    def draw(out_ptr, n, seed, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        big = offs.to(tl.int64) * 4294967311  # > 2^32: exercises the counter's high word
        tl.store(out_ptr + offs, tl.randint(seed, big).to(tl.int64), mask=offs < n)

    n = 3000
    for seed in (0, 1, 2**62 + 12345):
        out = torch.empty(n, dtype=torch.int64, device=DEVICE)
        draw[(3,)](out, n, seed, BLOCK=1024)
        offs = torch.arange(n, dtype=torch.int64) * 4294967311
        assert torch.equal(out.cpu(), philox_bits(seed, offs))
    # a counter-based stream: a prefix does not depend on how many values are drawn
    assert torch.equal(philox_bits(7, torch.arange(10)), philox_bits(7, torch.arange(100))[:10])


@pytest.mark.parametrize("name", FORMATS)
def test_normal_range_equals_the_reference_fed_the_same_bits(name: str):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(3)
    mag = torch.exp2(torch.empty(20000).uniform_(fmt.emin, fmt.emax + 0.9, generator=g))
    y = mag * torch.where(torch.rand(20000, generator=g) < 0.5, -1.0, 1.0)
    k = 23 - fmt.mbits
    # round_to_format draws exactly one randint(0, 2^k) per element when nothing is subnormal
    r = torch.randint(0, 1 << k, y.shape, generator=torch.Generator().manual_seed(9))
    r = r.to(torch.int64) | (torch.randint(0, 1 << (32 - k), y.shape) << k)  # high bits unused
    want = round_to_format(y, fmt, "stochastic", generator=torch.Generator().manual_seed(9))
    assert_same(round_with_bits(y, fmt, r), want, name)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp4_e2m1", "int8"])
def test_subnormals_and_integers_are_unbiased(name: str):
    fmt = get_format(name)
    lo, hi = (0.0, fmt.min_subnormal) if not fmt.is_int else (3.0, 4.0)
    n = 40000
    p = 0.3
    y = torch.full((n,), lo + p * (hi - lo))
    bits = philox_bits(11, torch.arange(n))
    q = round_with_bits(y, fmt, bits)
    assert set(q.unique().tolist()) == {lo, hi}
    up = float((q == hi).float().mean())
    assert abs(up - p) < 5 * (p * (1 - p) / n) ** 0.5


@pytest.mark.parametrize("recipe_spec", [
    QuantSpec("fp8_e4m3"),
    QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3"),
    QuantSpec("fp6_e2m3", scaling="block", block_size=32, scale_format="e8m0", hadamard=32),
])  # fmt: skip
def test_nearest_is_fake_quantize(recipe_spec: QuantSpec):
    x = randn(32, 64, seed=1, scale=3.0).cpu()
    assert_same(fake_quantize_with_bits(x, recipe_spec, None), fake_quantize(x, recipe_spec))
