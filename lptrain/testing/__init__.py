"""Helpers shared by the tests and the benchmarks (importable, so nothing edits sys.path):
`sqnr_db`, `Problem` (a fixed GEMM problem with float64 references) and `tinylm` (a small
transformer on a synthetic task)."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from lptrain.nn import Linear


def sqnr_db(got: torch.Tensor, ref: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |got - ref|^2) in float64 (inf when equal)."""
    got, ref = got.detach().double(), ref.detach().double()
    err = (got - ref).square().sum()
    return float("inf") if err == 0 else float(10 * torch.log10(ref.square().sum() / err))


class Problem:
    """x (T, K), w (N, K), dy (T, N) and the three float64 reference GEMMs."""

    def __init__(self, t: int = 256, k: int = 256, n: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(t, k, generator=g)
        self.w = torch.randn(n, k, generator=g) * k**-0.5
        self.dy = torch.randn(t, n, generator=g)
        x, w, dy = self.x.double(), self.w.double(), self.dy.double()
        self.y_ref, self.dx_ref, self.dw_ref = x @ w.T, dy @ w, dy.T @ x

    def layer(self, recipe, **kw) -> Linear:
        lin = Linear(self.x.shape[1], self.w.shape[0], bias=False, recipe=recipe, **kw)
        with torch.no_grad():
            lin.weight.copy_(self.w)
        return lin

    def run(self, lin: torch.nn.Module):
        """(y, dx, dw) of one forward + backward; clears the weight gradient first."""
        lin.weight.grad = None
        x = self.x.clone().requires_grad_()
        y = lin(x)
        y.backward(self.dy)
        return y.detach(), x.grad, lin.weight.grad.clone()


def grads_plain_and_recomputed(
    model: torch.nn.Module, x: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameter gradients of model(x).sum() without, then with, non-reentrant activation
    checkpointing (whose backward recomputes the forward): a layer keeps the house rule when
    the two lists are bit-identical."""

    grads = []
    for recompute in (False, True):
        model.zero_grad()
        y = checkpoint(model, x, use_reentrant=False) if recompute else model(x)
        y.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    return grads[0], grads[1]
