"""Saved bytes of one decoder block, shared quantized inputs off and on (BENCHMARKS.md): what
autograd keeps for backward (saved_tensors_hooks, a quantized operand's codes and scales counted
as stored), per recipe, on the emulated backend and on the Triton backend under its CPU
interpreter (the same tensors it keeps on a GPU).

    python benchmarks/bench_saved_bytes.py [--dim 256] [--tokens 128,256]

The block is the `small` preset's (dim 256, 4 heads, SwiGLU 768) in bf16; attention is counted
as FlashAttention saves it (lptrain/distributed/memory.py). Two token counts split the total
into bytes per token (the slope) and bytes per linear parameter (the rest: weight copies saved
until backward).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

import lptrain.nn as lpnn  # noqa: E402
from lptrain.config.schema import ModelConfig  # noqa: E402
from lptrain.distributed.memory import saved_bytes  # noqa: E402
from lptrain.models.decoder import Block, model_args  # noqa: E402
from lptrain.nn.backends import EmulatedBackend  # noqa: E402

RECIPES = ["bf16", "fp8-delayed", "fp8-current", "fp8-rowwise", "fp8-block", "mxfp8", "nvfp4"]


def saved(recipe: str, backend: str, share: bool, dim: int, tokens: int) -> tuple[int, int]:
    """(bytes saved by one block's forward on `tokens` tokens, its linear parameters)."""
    from lptrain.nn.backends.triton import TritonBackend  # optional dependency (gpu extra)

    args = model_args(ModelConfig(preset="small", dim=dim), 256, tokens)
    torch.manual_seed(0)
    block = Block(args).to(torch.bfloat16)
    if recipe != "bf16":
        be = TritonBackend() if backend == "triton" else EmulatedBackend()
        be.share_inputs = share
        lpnn.convert(block, recipe, backend="emulated", log_fn=lambda _: None)
        for _, layer in lpnn.quantized_layers(block):
            layer.backend = be
    x = torch.randn(1, tokens, args.dim, dtype=torch.bfloat16, requires_grad=True)
    half = args.dim // args.n_heads // 2
    with np.errstate(all="ignore"):
        total = saved_bytes(block, x, torch.randn(tokens, half), torch.randn(tokens, half))
    linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    return total, linear


def split(recipe: str, backend: str, share: bool, dim: int, tokens: list[int]):
    """(bytes per token, bytes per linear parameter) from two token counts."""
    (a, linear), (b, _) = (saved(recipe, backend, share, dim, t) for t in tokens)
    slope = (b - a) / (tokens[1] - tokens[0])
    return slope, (a - slope * tokens[0]) / linear


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tokens", default="128,256")
    ap.add_argument("--backends", default="emulated,triton")
    a = ap.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    print("| recipe | backend | B/token, sharing off | on | cut | B/linear param saved |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for backend in a.backends.split(","):
        for recipe in RECIPES:
            off, per_param = split(recipe, backend, False, a.dim, tokens)
            on, _ = split(recipe, backend, True, a.dim, tokens)
            print(
                f"| {recipe} | {backend} | {off:,.0f} | {on:,.0f} | "
                f"{off - on:,.0f} ({(off - on) / off:.0%}) | {per_param:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
