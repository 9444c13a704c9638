"""Per-layer quantization statistics of one optimizer step, reduced over ranks, as metrics.

Each lptrain layer merges its micro-batches itself (`lptrain.nn.stats_window`); this module
reduces those per-rank results over the data-parallel group with the same moments
(`numerics.stats`: MAX of amax, element-weighted means of fractions, SQNR from summed energies),
so every rank ends with identical numbers (the precision guard decides on them), and names them
`quant/<layer>/<gemm>.<operand>/<stat>`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from lptrain.config.schema import MonitorConfig
from lptrain.nn import Linear, stats_window
from lptrain.nn.select import matches, require_match  # noqa: F401  (runner.py's)
from lptrain.numerics.stats import (
    MAX_MOMENTS,
    MIN_MOMENTS,
    SUM_MOMENTS,
    from_moments,
    to_moments,
)

Stats = dict[str, dict[str, dict[str, float]]]  # layer -> 'gemm.operand' -> stat -> value
COUNTERS = ("int32_overflows", "chunk_sums")  # the INT32 accumulator's entries


def linear_layers(model: nn.Module, globs: list[str]) -> dict[str, nn.Linear]:
    """Every linear layer (lptrain's and plain nn.Linear) whose name matches, in model order."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and matches(name, globs)
    }


def quantizing(layers: dict[str, nn.Module]) -> dict[str, Linear]:
    return {n: m for n, m in layers.items() if isinstance(m, Linear) and m.recipe.quantizes}


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _union_keys(stats: Stats) -> list[tuple[str, str]]:
    keys = sorted((layer, key) for layer, entries in stats.items() for key in entries)
    if _world() == 1:
        return keys
    gathered: list = [None] * _world()
    dist.all_gather_object(gathered, keys)  # a rank without a call has no entry
    return sorted({tuple(k) for ks in gathered for k in ks})


def _device() -> str:
    return "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"


def reduce_over_ranks(stats: Stats) -> Stats:
    """Every rank's merged statistics combined, on every rank (three all-reduces)."""
    keys = _union_keys(stats)
    if _world() == 1:
        return stats
    sums, maxes = [], []
    for layer, key in keys:
        entry = stats.get(layer, {}).get(key)
        if key.endswith(".accumulator"):
            sums += [entry.get(c, 0.0) if entry else 0.0 for c in COUNTERS]
            continue
        m = to_moments(entry) if entry else _empty_moments()
        sums += [m[k] for k in SUM_MOMENTS]
        maxes += [m[k] for k in MAX_MOMENTS] + [-m[k] for k in MIN_MOMENTS]  # min = -max(-x)
    s = torch.tensor(sums, dtype=torch.float64, device=_device())
    x = torch.tensor(maxes, dtype=torch.float64, device=_device())
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return _unpack(keys, s.tolist(), x.tolist())


def _empty_moments() -> dict[str, float]:
    out = {k: 0.0 for k in SUM_MOMENTS}
    out.update({k: -math.inf for k in MAX_MOMENTS})
    out.update({k: math.inf for k in MIN_MOMENTS})
    return out


def _unpack(keys, sums: list[float], maxes: list[float]) -> Stats:
    """The inverse of the packing in `reduce_over_ranks` (same key order)."""
    out: Stats = {}
    s, x = iter(sums), iter(maxes)
    for layer, key in keys:
        if key.endswith(".accumulator"):
            out.setdefault(layer, {})[key] = {c: next(s) for c in COUNTERS}
            continue
        m = {k: next(s) for k in SUM_MOMENTS}
        m.update({k: next(x) for k in MAX_MOMENTS})
        m.update({k: -next(x) for k in MIN_MOMENTS})
        out.setdefault(layer, {})[key] = from_moments(m)
    return out


def _block_scaled(layer: Linear, key: str) -> bool:
    gemm, operand = key.split(".")
    spec = layer.recipe.spec(gemm, operand)
    return spec is not None and spec.scaling in ("row", "block")


def quant_metrics(stats: Stats, wanted: list[str], layers: dict[str, Linear]) -> dict[str, float]:
    """`quant/<layer>/<gemm>.<operand>/<stat>`. `scale` is one value for per-tensor scales and
    scale_min / scale_max for per-row and per-block ones; the INT32 accumulator's overflow
    count is always included for recipes that have one."""
    out: dict[str, float] = {}
    order = [n for n in layers if n in stats] + [n for n in stats if n not in layers]
    for layer in order:  # model order, so that readers list layers as the model has them
        for key, d in sorted(stats[layer].items()):
            prefix = f"quant/{layer}/{key}"
            if key.endswith(".accumulator"):
                out[f"{prefix}/int32_overflows"] = d["int32_overflows"]
                continue
            for stat in wanted:
                if stat != "scale":
                    out[f"{prefix}/{stat}"] = d[stat]
                elif layer in layers and _block_scaled(layers[layer], key):
                    out[f"{prefix}/scale_min"] = d["scale_min"]
                    out[f"{prefix}/scale_max"] = d["scale_max"]
                else:
                    out[f"{prefix}/scale"] = d["scale_mean"]
    return out


def keys_per_layer(recipe, wanted: list[str]) -> int:
    """The `quant/` keys one layer of `recipe` gives per row, counted on a 64x64 probe layer
    of that recipe (one emulated forward and backward on the CPU): the count follows the
    recipe's operands, reused copies and scale kinds exactly, without a rule to keep in step."""
    probe = Linear(64, 64, bias=False, recipe=recipe, backend="emulated", seed=0)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with stats_window({"probe": probe}) as stats:
        probe(x).square().mean().backward()
    return len(quant_metrics(stats, wanted, {"probe": probe}))


def key_count(layers: dict[str, nn.Module], trained: dict, cfg: MonitorConfig) -> int:
    """Keys of one per-layer row (layers.jsonl and W&B): `quant/` keys per quantizing layer,
    and per trained layer its gradient norm, update ratio and gradient fidelity (two)."""
    per_recipe: dict[str, int] = {}
    n = 0
    if cfg.stats:
        for layer in quantizing(layers).values():
            name = repr(layer.recipe.to_dict())
            if name not in per_recipe:
                per_recipe[name] = keys_per_layer(layer.recipe, list(cfg.stats))
            n += per_recipe[name]
    return n + len(trained) * (cfg.grad_norm + cfg.update_ratio + 2 * cfg.fidelity)
