"""Saved bytes of one decoder block (BENCHMARKS.md): what autograd keeps for backward
(saved_tensors_hooks, a quantized operand's codes and scales counted as stored), per recipe, on
the emulated backend and on the Triton backend under its CPU interpreter (the same tensors it
keeps on a GPU). Two tables: shared quantized inputs off and on (`--table sharing`), and
`precision.saved_activations` none and fp8 against bf16 (`--table activations`, sharing on as
the trainer runs it).

    python benchmarks/bench_saved_bytes.py [--table sharing|activations] [--dim 256]

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
from lptrain.models.decoder import Block, model_args, set_saved_activations  # noqa: E402
from lptrain.nn.backends import EmulatedBackend  # noqa: E402

RECIPES = ["bf16", "fp8-delayed", "fp8-current", "fp8-rowwise", "fp8-block", "mxfp8", "nvfp4"]


def saved(
    recipe: str, backend: str, share: bool, dim: int, tokens: int, acts: str = "none"
) -> tuple[int, int]:
    """(bytes saved by one block's forward on `tokens` tokens, its linear parameters);
    `acts`: precision.saved_activations."""
    from lptrain.nn.backends.triton import TritonBackend  # optional dependency (gpu extra)

    args = model_args(ModelConfig(preset="small", dim=dim), 256, tokens)
    torch.manual_seed(0)
    block = Block(args).to(torch.bfloat16)
    set_saved_activations(block, acts)
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


def split(recipe: str, backend: str, share: bool, dim: int, tokens: list[int], acts="none"):
    """(bytes per token, bytes per linear parameter) from two token counts."""
    (a, linear), (b, _) = (saved(recipe, backend, share, dim, t, acts) for t in tokens)
    slope = (b - a) / (tokens[1] - tokens[0])
    return slope, (a - slope * tokens[0]) / linear


def sharing_table(backends: list[str], dim: int, tokens: list[int]) -> None:
    print("| recipe | backend | B/token, sharing off | on | cut | B/linear param saved |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for backend in backends:
        for recipe in RECIPES:
            off, per_param = split(recipe, backend, False, dim, tokens)
            on, _ = split(recipe, backend, True, dim, tokens)
            print(
                f"| {recipe} | {backend} | {off:,.0f} | {on:,.0f} | "
                f"{off - on:,.0f} ({(off - on) / off:.0%}) | {per_param:.2f} |",
                flush=True,
            )


def activations_table(backends: list[str], recipes: list[str], dim: int, tokens: list[int]):
    """B/token with saved activations none and fp8, each against bf16 GEMMs with bf16
    activations (the first row)."""
    base, _ = split("bf16", "emulated", True, dim, tokens)
    print("| GEMMs | backend | B/token, activations as they are | x bf16 | fp8 saved | x bf16 |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for backend in backends:
        for recipe in recipes:
            if recipe == "bf16" and backend != backends[0]:
                continue  # no quantized layer: the backend changes nothing
            none, _ = split(recipe, backend, True, dim, tokens)
            fp8, _ = split(recipe, backend, True, dim, tokens, "fp8")
            print(
                f"| {recipe} | {backend} | {none:,.0f} | {none / base:.3f} | {fp8:,.0f} | "
                f"{fp8 / base:.3f} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", choices=["sharing", "activations"], default="sharing")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--tokens", default="128,256")
    ap.add_argument("--backends", default="emulated,triton")
    ap.add_argument("--recipes", default="bf16,fp8-delayed,fp8-current,fp8-block,mxfp8")
    a = ap.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    backends = a.backends.split(",")
    if a.table == "sharing":
        sharing_table(backends, a.dim, tokens)
    else:
        activations_table(backends, a.recipes.split(","), a.dim, tokens)


if __name__ == "__main__":
    main()
