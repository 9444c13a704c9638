"""Per-block Hessian traces by Hutchinson's estimator (algorithms.md §7.3 step 1).

For blocks θ_1..θ_L of the parameters and a loss L(θ): draw a Rademacher vector v (±1 per
parameter), compute Hv by double back-propagation (the gradient of ⟨∇_θ L, v⟩, the first
gradient taken with create_graph=True), and record v_lᵀ(Hv)_l per block. E[v_lᵀ(Hv)_l] =
tr(H_ll): the cross-block terms v_lᵀ H_lk v_k (k ≠ l) have mean zero. With several data
batches, Hv is their batch-size-weighted mean. The running mean of each block stops when it
moves by less than `tol` relatively (|m_i - m_{i-1}| / (|m_{i-1}| + 1e-6) < tol for every
block) or after `max_iter` draws. HASB then divides each trace by the block's size (the
"average Hessian trace", HMT).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class TraceResult:
    traces: dict[str, float]  # tr(H_ll) estimates (running means)
    iterations: int
    history: list[dict[str, float]]  # the running means after each draw


def rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    r = torch.randint(0, 2, like.shape, generator=gen, dtype=torch.int64)
    return (r * 2 - 1).to(like.dtype).to(like.device)


def _converged(prev: dict, cur: dict, tol: float) -> bool:
    return all(abs(cur[k] - prev[k]) / (abs(prev[k]) + 1e-6) < tol for k in cur)


def hutchinson(
    losses: Sequence[Callable[[], tuple[torch.Tensor, float]]],
    blocks: Mapping[str, Sequence[torch.Tensor]],
    *,
    max_iter: int = 7,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> TraceResult:
    """Per-block trace estimates. `losses`: one callable per data batch returning (loss,
    batch weight); `blocks`: name -> the parameters of that block (requires_grad)."""
    gen = generator or torch.Generator().manual_seed(0)
    names = list(blocks)
    params = [p for n in names for p in blocks[n]]
    grads, weights = [], []
    for fn in losses:  # keep each batch's graph: one double back-prop per draw and batch
        loss, weight = fn()
        grads.append(torch.autograd.grad(loss, params, create_graph=True))
        weights.append(float(weight))
    total = sum(weights)
    mean: dict[str, float] = {}
    history: list[dict[str, float]] = []
    for i in range(1, max_iter + 1):
        vs = [rademacher(p, gen) for p in params]
        hv = [torch.zeros_like(p) for p in params]
        for g, w in zip(grads, weights, strict=True):
            dot = sum((gi * vi).sum() for gi, vi in zip(g, vs, strict=True))
            for acc, h in zip(hv, torch.autograd.grad(dot, params, retain_graph=True), strict=True):
                acc.add_(h.detach(), alpha=w / total)
        sample, k = {}, 0
        for n in names:
            cnt = len(blocks[n])
            sample[n] = float(
                sum((v * h).sum() for v, h in zip(vs[k : k + cnt], hv[k : k + cnt], strict=True))
            )
            k += cnt
        prev = dict(mean)
        mean = {n: prev.get(n, 0.0) + (sample[n] - prev.get(n, 0.0)) / i for n in names}
        history.append(dict(mean))
        if i > 1 and _converged(prev, mean, tol):
            break
    return TraceResult(mean, len(history), history)


@contextlib.contextmanager
def _double_backward_attention():
    """Fused attention kernels have no double backward; the math kernel has."""

    with sdpa_kernel(SDPBackend.MATH):
        yield


def layer_traces(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    batches: Sequence[torch.Tensor],
    *,
    max_iter: int = 7,
    tol: float = 1e-3,
    seed: int = 0,
) -> tuple[dict[str, float], TraceResult]:
    """{layer: HMT = tr(H_ll) / #weights} of `model(batch) -> loss` w.r.t. each layer's weight,
    in eval mode (no dropout; quantizer state untouched). Same inputs and seed on every rank
    give the same traces."""
    was_training = model.training
    model.eval()
    try:
        with _double_backward_attention():
            losses = [(lambda b=b: (model(b), b.shape[0])) for b in batches]
            gen = torch.Generator().manual_seed(seed)
            blocks = {n: [w] for n, w in weights.items()}
            res = hutchinson(losses, blocks, max_iter=max_iter, tol=tol, generator=gen)
    finally:
        model.train(was_training)
    return {n: res.traces[n] / weights[n].numel() for n in weights}, res
