"""Per-layer monitoring keys of a recipe file, per layer and per block, without training: the
model is built on the `meta` device (layer names and recipes, no weights) and converted; each
recipe's keys are read off a 64x64 probe layer on the CPU (observe/layers.py `key_names`), as
the trainer's start line counts them. Prints a markdown table for docs/monitoring.md.

usage: .venv/bin/python benchmarks/count_monitor_keys.py RECIPE.yaml [...] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def count(recipe_file: str, overrides: list[str]) -> dict:
    import lptrain.nn as lpnn
    from lptrain.config import schema
    from lptrain.config.precision import is_high_precision
    from lptrain.models.decoder import build_model
    from lptrain.observe import layers as L

    cfg = schema.load(recipe_file, overrides)
    with torch.device("meta"):
        model = build_model(cfg.model, vocab_size=257, max_seq_len=cfg.data.block_size)
    if not is_high_precision(cfg.precision):
        lpnn.convert(model, cfg.precision.recipe, skip=cfg.precision.skip, backend="emulated",
                     log_fn=lambda _: None)  # fmt: skip
    layers = L.linear_layers(model, cfg.monitor.layers)
    trained = {n: m for n, m in layers.items() if m.weight is not None}
    shadows = L.shadow_recipes(cfg)
    out = {"layers": len(layers), "quantized": len(L.quantizing(layers))}
    for mode in ("layer", "block"):
        m = dataclasses.replace(cfg.monitor, aggregate=mode)
        out[mode] = L.key_count(layers, trained, m, shadows)
    out["blocks"] = len({L.block_of(n) for n in layers})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    extra = f" ({', '.join(args.overrides)})" if args.overrides else ""
    print(f"| recipe file{extra} | layers (quantized) | blocks | keys per layer | per block |")
    print("|---|---:|---:|---:|---:|")
    for recipe in args.recipes:
        c = count(recipe, args.overrides)
        name = Path(recipe).name
        print(f"| {name} | {c['layers']} ({c['quantized']}) | {c['blocks']} | {c['layer']:,} | "
              f"{c['block']:,} |")  # fmt: skip


if __name__ == "__main__":
    main()
