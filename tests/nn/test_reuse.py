"""Backward operands that reuse a forward-quantized copy (nn/reuse.py) give bit for bit what
quantizing again would."""

from __future__ import annotations

import pytest
import torch

from lptrain import recipes
from lptrain.nn import Linear


@pytest.mark.parametrize("name", sorted(n for n in recipes.names() if recipes.get(n).quantizes))
def test_reused_backward_copies_equal_requantizing(name: str, monkeypatch):
    """Where the backward reuses a forward-quantized copy (per-tensor scaling, square weight
    tiles), the result is bit for bit that of quantizing again; odd shapes exercise padding."""
    import lptrain.nn.linear as linear_mod

    recipe = recipes.get(name)
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 50, 200, generator=g), torch.randn(136, 200, generator=g) * 0.07
    dys = [torch.randn(3, 50, 136, generator=g) for _ in range(3)]

    def run(lin: Linear):
        with torch.no_grad():
            lin.weight.copy_(w)
        outs = []
        for dy in dys:  # three steps: delayed scaling's histories must stay in step too
            lin.weight.grad = None
            xx = x.clone().requires_grad_()
            y = lin(xx)
            y.backward(dy)
            outs.append((y, xx.grad, lin.weight.grad.clone()))
        return outs

    aliased = Linear(200, 136, bias=False, recipe=recipe, seed=0)
    monkeypatch.setattr(linear_mod, "reuse_aliases", lambda recipe: {})
    plain = Linear(200, 136, bias=False, recipe=recipe, seed=0)
    assert plain.aliases == {}
    reusing = {"fp8-current", "fp8-delayed", "fp8-block", "nvfp4"}
    assert bool(aliased.aliases) == (name in reusing), aliased.aliases
    for step, (a, b) in enumerate(zip(run(aliased), run(plain), strict=True)):
        for what, u, v in zip(("output", "grad_input", "grad_weight"), a, b, strict=True):
            assert torch.equal(u, v), f"{name} step {step}: {what} differs"
