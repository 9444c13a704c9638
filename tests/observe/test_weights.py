"""Per-layer gradient norms and update ratios (observe/weights.py), one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lptrain.observe import weights


def test_grad_norms_and_update_ratios():
    torch.manual_seed(0)
    layers = {"a": nn.Linear(8, 4, bias=False), "b": nn.Linear(4, 2, bias=False)}
    model = nn.Sequential(layers["a"], nn.Tanh(), layers["b"])
    model(torch.randn(5, 8)).square().sum().backward()
    norms = weights.grad_norms(layers)
    for name, m in layers.items():
        assert norms[name] == pytest.approx(float(m.weight.grad.norm()), rel=1e-6)
    before = weights.snapshot(layers)
    with torch.no_grad():
        layers["a"].weight.mul_(1.5)  # |dW| / |W| = 0.5
        layers["b"].weight.add_(0.0)
    ratios = weights.update_ratios(layers, before)
    assert ratios["a"] == pytest.approx(0.5, rel=1e-6) and ratios["b"] == 0.0
