"""Shared fixtures for the lptrain.nn tests (helpers live in lptrain.testing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lptrain
from lptrain.nn import seed_quantizers
from lptrain.testing import Problem


@pytest.fixture(scope="module")
def problem() -> Problem:
    return Problem()


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 64)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attn": nn.Linear(64, 64),
                    "mlp": nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)),
                }
            )
            for _ in range(2)
        )
        self.small = nn.Linear(64, 8)
        self.lm_head = nn.Linear(64, 16, bias=False)

    def forward(self, idx):
        h = self.embed(idx)
        for b in self.blocks:
            h = h + b["attn"](h)
            h = h + b["mlp"](h)
        return self.lm_head(h) + self.small(h).sum(-1, keepdim=True)


def _build(recipe):
    torch.manual_seed(0)
    m = lptrain.convert(Nested(), recipe, skip=("lm_head",))
    seed_quantizers(m, 3)
    return m


def _steps(m, opt, n, start):
    outs = []
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(i)
        idx = torch.randint(0, 16, (4, 32), generator=g)
        out = m(idx)
        loss = out.float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        outs.append(out.detach())
    return torch.stack(outs)
