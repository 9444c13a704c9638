"""A compact causal transformer and a fixed synthetic task (a noisy successor chain).

Shared by the training test and benchmarks/bench_recipes_loss.py
(2 layers, d=64, 4 heads, seq 32, vocab 64)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import lptrain

VOCAB, SEQ, D, HEADS, LAYERS = 64, 32, 64, 4, 2


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):  # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(
        self,
        vocab: int = VOCAB,
        seq: int = SEQ,
        d: int = D,
        heads: int = HEADS,
        layers: int = LAYERS,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:  # GPT-2 residual scaling
            nn.init.normal_(blk.fc2.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx):  # (B, T) -> (B, T, vocab)
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def task_batch(gen: torch.Generator, batch: int, seq: int = SEQ, vocab: int = VOCAB):
    """A noisy successor chain: x[t+1] = PERM[x[t]] with probability 3/4, else uniform.

    Learnable in a few hundred steps by a tiny model, with an entropy floor of ~1.58 nats
    (chance: ln 64 = 4.16), so a 2% loss comparison between recipes is meaningful.
    """
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
    x = torch.empty(batch, seq, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    noise = torch.randint(0, vocab, (batch, seq), generator=gen)
    keep = torch.rand(batch, seq, generator=gen) < 0.75
    for t in range(1, seq):
        x[:, t] = torch.where(keep[:, t], perm[x[:, t - 1]], noise[:, t])
    return x[:, :-1], x[:, 1:]


def train(
    recipe: str | dict,
    steps: int,
    batch: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 0,
) -> float:
    """Train TinyLM converted with `recipe` (a name or an inline recipe; lm_head kept FP32);
    return the final eval loss."""
    torch.manual_seed(seed)
    model = lptrain.convert(TinyLM(), recipe, skip=("lm_head",))
    lptrain.nn.seed_quantizers(model, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    gen = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe == "bf16")
    for step in range(steps):
        x, y = task_batch(gen, batch)
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"{recipe} step {step} loss {loss.item():.4f}")
    x, y = task_batch(torch.Generator().manual_seed(10_000 + seed), 256)
    model.eval()
    with torch.no_grad(), autocast:
        logits = model(x)
    return float(F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1)))
