"""A minimal training loop: a small GPT converted with lptrain, trained in plain PyTorch (no
DeepSpeed, no trainer, no recipe file), nanoGPT-style, on the embedded pydoc-topics corpus.

    python examples/minimal_loop.py                      # fp8-current, 200 steps, ~1 min on 2 cores
    python examples/minimal_loop.py --recipe nvfp4 --steps 50

Everything lptrain-specific is the one `lptrain.convert` call: the linear layers' three GEMMs
then run in the recipe's formats (emulated bit for bit on a CPU; Triton or TE on a GPU).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import lptrain
from lptrain.corpora import documents


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, -1).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 128, layers: int = 2, heads: int = 4, ctx=64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(layers)))
        self.ln, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.lm_head(self.ln(self.blocks(x)))


def batches(data: torch.Tensor, ctx: int, batch: int, gen: torch.Generator):
    while True:
        i = torch.randint(len(data) - ctx - 1, (batch,), generator=gen)
        x = torch.stack([data[j : j + ctx + 1] for j in i.tolist()])
        yield x[:, :-1], x[:, 1:]


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="fp8-current", help="a name from `lptrain recipes`")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    text = "\n".join(documents("embedded:pydoc-topics")).encode()
    data = torch.tensor(list(text), dtype=torch.long)  # bytes are the tokens
    model = GPT()
    # The one lptrain line: every nn.Linear but the output head runs the recipe's GEMMs.
    lptrain.convert(model, args.recipe, log_fn=print)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    stream = batches(data, 64, args.batch, torch.Generator().manual_seed(0))
    for step in range(args.steps):
        x, y = next(stream)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
