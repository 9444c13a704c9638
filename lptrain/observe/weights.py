"""Per-layer gradient norms and update-to-weight ratios, in every ZeRO stage.

Outside a module's forward, ZeRO-3 keeps only a partition of each weight (and of its
gradient), so a norm is the square root of the sum over ranks of the local partitions' squared
norms; ZeRO-1/2 partition only optimizer state and gradients, and DeepSpeed's
`safe_get_full_grad` assembles a gradient (a collective: every rank calls it, in the same
order). Gradients are read between the last backward of the step and the optimizer update
(the gradient-accumulation boundary), when they are reduced over ranks and not yet cleared.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def _partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")  # a ZeRO-3 parameter


def _grad(p: nn.Parameter) -> torch.Tensor | None:
    if _partitioned(p):
        from deepspeed.utils import safe_get_local_grad  # optional dependency (the train extra)

        return safe_get_local_grad(p)
    if p.grad is not None:
        return p.grad
    try:
        from deepspeed.utils import safe_get_full_grad  # optional dependency (the train extra)
    except ImportError:
        return None
    return safe_get_full_grad(p)


def _weight(p: nn.Parameter) -> torch.Tensor:
    if _partitioned(p):
        from deepspeed.utils import (
            safe_get_local_fp32_param,  # optional dependency (the train extra)
        )

        return safe_get_local_fp32_param(p)
    return p.detach()


def _sq(t: torch.Tensor | None) -> float:
    return 0.0 if t is None else float(torch.linalg.vector_norm(t.float()).square())


def _norms(layers: dict[str, nn.Module], squares: list[float], partitioned: list[bool]):
    """Square roots, with the squares of partitioned tensors summed over ranks first."""
    if any(partitioned) and dist.is_initialized() and dist.get_world_size() > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(squares, dtype=torch.float64, device=device)
        mask = torch.tensor(partitioned, device=device)
        summed = t.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        squares = torch.where(mask, summed, t).tolist()
    return dict(zip(layers, (math.sqrt(s) for s in squares), strict=True))


def grad_norms(layers: dict[str, nn.Module]) -> dict[str, float]:
    """L2 norm of each layer's weight gradient (the data-parallel mean, as the optimizer sees
    it); call at the accumulation boundary, before the update."""
    params = [m.weight for m in layers.values()]
    squares = [_sq(_grad(p)) for p in params]
    return _norms(layers, squares, [_partitioned(p) for p in params])


def snapshot(layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Copies of the (local) weights before an optimizer step."""
    return {n: _weight(m.weight).clone() for n, m in layers.items()}


def update_ratios(layers: dict[str, nn.Module], before: dict[str, torch.Tensor]) -> dict:
    """|W_after - W_before| / |W_before| per layer."""
    params = [m.weight for m in layers.values()]
    after = [_weight(p) for p in params]
    parts = [_partitioned(p) for p in params]
    deltas = _norms(layers, [_sq(a - before[n]) for n, a in zip(layers, after, strict=True)], parts)
    bases = _norms(layers, [_sq(before[n]) for n in layers], parts)
    return {n: deltas[n] / bases[n] if bases[n] > 0 else float("nan") for n in layers}
