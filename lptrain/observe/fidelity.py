"""Gradient fidelity on a fixed probe batch (Quartet's measure, algorithms.md §8.3).

For each linear layer: the weight gradient under the recipe, g_hat, against the gradient of the
same network with every lptrain layer computing in high precision, g (`disable_quantization`):
cosine <g_hat, g> / (|g_hat| |g|) and alignment <g_hat, g> / <g, g> (1 for an unbiased scheme).
Both are 1.0 exactly when nothing is quantized: the two gradients are then the same numbers, and
sqrt(x * x) == x in binary floating point, so <g, g> / sqrt(<g, g> <g, g>) is exactly 1.

The probe changes nothing that training uses: it runs in eval mode (no dropout, quantizer state
used and never updated, no draw from torch's generator), takes gradients with
`torch.autograd.grad` (nothing accumulates into `.grad`, DeepSpeed's gradient hooks do not fire)
and the batch is fixed (the data order is untouched). Every rank runs the same batch: ZeRO-3
gathers weights inside the forward, so all ranks must take part anyway.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lptrain.nn import disable_quantization


def _weight_grads(model: nn.Module, batch: torch.Tensor, params: list) -> list:
    loss = model(batch)
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def gradient_fidelity(
    model: nn.Module, batch: torch.Tensor, layers: dict[str, nn.Module]
) -> dict[str, tuple[float, float]]:
    """{layer: (cosine, alignment)} of the recipe's weight gradients against high precision."""
    training = model.training
    params = [m.weight for m in layers.values()]
    model.eval()
    try:
        with torch.enable_grad():
            low = _weight_grads(model, batch, params)
            with disable_quantization(model):
                high = _weight_grads(model, batch, params)
    finally:
        model.train(training)
    return {n: _cosine_alignment(a, b) for n, a, b in zip(layers, low, high, strict=True)}


def _cosine_alignment(g_hat, g) -> tuple[float, float]:
    if g_hat is None or g is None:
        return float("nan"), float("nan")
    a, b = g_hat.double().flatten(), g.double().flatten()
    dot, aa, bb = float(a @ b), float(a @ a), float(b @ b)
    if aa == 0 or bb == 0:
        return float("nan"), float("nan")
    norms = math.sqrt(aa * bb) if math.isfinite(aa * bb) else math.sqrt(aa) * math.sqrt(bb)
    return dot / norms, dot / bb
