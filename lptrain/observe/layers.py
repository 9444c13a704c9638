"""Per-layer quantization statistics of one optimizer step, reduced over ranks, as metrics.

Each lptrain layer merges its micro-batches itself (`lptrain.nn.stats_window`); this module
reduces those per-rank results over the data-parallel group with the same moments
(`numerics.stats`: MAX of amax, element-weighted means of fractions, SQNR from summed energies),
so every rank ends with identical numbers (the precision guard decides on them), and names them
`quant/<layer>/<gemm>.<operand>/<stat>`.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from lptrain import recipes
from lptrain.config.precision import is_high_precision, resolve_recipe
from lptrain.config.schema import MonitorConfig, TrainConfig
from lptrain.errors import ConfigError
from lptrain.nn import Linear, shadow, stats_window
from lptrain.nn.recipe import Recipe
from lptrain.nn.select import matches
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


def require_match(key: str, globs: list[str], names: list[str], what: str) -> None:
    """ConfigError(key) when no name matches any of `globs`: the setting would watch nothing
    (rows with only a step, a guard that never acts), silently."""
    if any(matches(n, globs) for n in names):
        idle = [g for g in globs if not any(matches(n, (g,)) for n in names)]
        if idle:  # the others match: a typo in one entry still deserves a word
            warnings.warn(f"{key}: {idle} match no {what} (the rest of the list does)",
                          stacklevel=2)  # fmt: skip
        return
    few = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
    raise ConfigError(key, f"{list(globs)} match no {what}; the model has {few or 'none'}")


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


def _block_scaled(recipe: Recipe, key: str) -> bool:
    gemm, operand = key.split(".")
    spec = recipe.spec(gemm, operand)
    return spec is not None and spec.scaling in ("row", "block")


def _operand_metrics(prefix: str, key: str, d: dict, wanted: list[str], recipe) -> dict:
    """One operand's `<prefix>/<stat>` entries; `recipe` (or None) says its scale kind."""
    if key.endswith(".accumulator"):
        return {f"{prefix}/int32_overflows": d["int32_overflows"]}
    out = {}
    for stat in wanted:
        if stat != "scale":
            out[f"{prefix}/{stat}"] = d[stat]
        elif recipe is not None and _block_scaled(recipe, key):
            out[f"{prefix}/scale_min"] = d["scale_min"]
            out[f"{prefix}/scale_max"] = d["scale_max"]
        else:
            out[f"{prefix}/scale"] = d["scale_mean"]
    return out


def _in_model_order(stats: Stats, layers: dict) -> list[str]:
    return [n for n in layers if n in stats] + [n for n in stats if n not in layers]


def quant_metrics(stats: Stats, wanted: list[str], layers: dict[str, Linear]) -> dict[str, float]:
    """`quant/<layer>/<gemm>.<operand>/<stat>`. `scale` is one value for per-tensor scales and
    scale_min / scale_max for per-row and per-block ones; the INT32 accumulator's overflow
    count is always included for recipes that have one."""
    out: dict[str, float] = {}
    for layer in _in_model_order(stats, layers):  # model order, as readers list layers
        recipe = layers[layer].recipe if layer in layers else None
        for key, d in sorted(stats[layer].items()):
            out.update(_operand_metrics(f"quant/{layer}/{key}", key, d, wanted, recipe))
    return out


# ---------------------------------------------------------------- shadow recipes


def shadow_recipes(cfg: TrainConfig) -> tuple[Recipe, ...]:
    """`monitor.shadow` resolved. A ConfigError naming the key for a name that is unknown, the
    run's own recipe, listed twice or unable to shadow (nn/shadow.py), and for shadows that
    would record nothing (no per-layer rows, no statistics, a run that converts no layer)."""
    names = cfg.monitor.shadow
    if not names:
        return ()
    key = "monitor.shadow"
    if not cfg.monitor.interval or not cfg.monitor.stats:
        raise ConfigError(key, "needs per-layer statistics (monitor.interval > 0, monitor.stats)")
    if is_high_precision(cfg.precision):
        raise ConfigError(
            key, f"precision.recipe {cfg.precision.recipe} converts no layer; shadows run "
            "inside lptrain layers (train with a low-precision recipe)",
        )  # fmt: skip
    live = resolve_recipe(cfg.precision)
    out = []
    for name in names:
        if name not in recipes.names():
            raise ConfigError(key, f"unknown recipe {name!r} (known: {', '.join(recipes.names())})")
        r = recipes.get(name)
        if r == live:
            raise ConfigError(
                key, f"{name!r} is the run's own recipe: its numbers are the quant/ keys"
            )
        if r in out:
            raise ConfigError(key, f"{name!r} is listed twice")
        if why := shadow.unsupported(r):
            raise ConfigError(key, f"{name!r} cannot be a shadow: it {why}")
        out.append(r)
    return tuple(out)


def split_shadows(stats: Stats) -> tuple[Stats, dict[str, Stats]]:
    """(the layers' own statistics, {shadow recipe: statistics}) from a window's statistics,
    whose shadow entries are keyed `<recipe>/<gemm>.<operand>`."""
    live: Stats = {}
    shadows: dict[str, Stats] = {}
    for layer, entries in stats.items():
        for key, d in entries.items():
            recipe, sep, operand = key.rpartition("/")
            if sep:
                shadows.setdefault(recipe, {}).setdefault(layer, {})[operand] = d
            else:
                live.setdefault(layer, {})[key] = d
    return live, shadows


def shadow_metrics(
    shadows: dict[str, Stats], wanted: list[str], layers: dict, by_name: dict[str, Recipe]
) -> dict[str, float]:
    """`shadow/<recipe>/<layer>/<gemm>.<operand>/<stat>`: the numbers `recipe` would give on
    the same operands (named apart from the live `quant/` keys)."""
    out: dict[str, float] = {}
    for name, stats in shadows.items():
        for layer in _in_model_order(stats, layers):
            for key, d in sorted(stats[layer].items()):
                prefix = f"shadow/{name}/{layer}/{key}"
                out.update(_operand_metrics(prefix, key, d, wanted, by_name[name]))
    return out


# ---------------------------------------------------------------- key counts


def keys_per_layer(recipe, wanted: list[str]) -> int:
    """The `quant/` keys one layer of `recipe` gives per row, counted on a 64x64 probe layer
    of that recipe (one emulated forward and backward on the CPU): the count follows the
    recipe's operands, reused copies and scale kinds exactly, without a rule to keep in step.
    A shadow of `recipe` gives as many (nn/shadow.py records the same operands)."""
    probe = Linear(64, 64, bias=False, recipe=recipe, backend="emulated", seed=0)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with stats_window({"probe": probe}) as stats:
        probe(x).square().mean().backward()
    return len(quant_metrics(stats, wanted, {"probe": probe}))


def key_count(
    layers: dict[str, nn.Module], trained: dict, cfg: MonitorConfig, shadows: tuple = ()
) -> int:
    """Keys of one per-layer row (layers.jsonl and W&B): `quant/` keys per quantizing layer
    and as many per shadow recipe, and per trained layer its gradient norm, update ratio and
    gradient fidelity (two)."""
    per_recipe: dict[str, int] = {}

    def keys(recipe) -> int:
        name = repr(recipe.to_dict())
        if name not in per_recipe:
            per_recipe[name] = keys_per_layer(recipe, list(cfg.stats))
        return per_recipe[name]

    n = 0
    if cfg.stats:
        for layer in quantizing(layers).values():
            n += keys(layer.recipe) + sum(keys(r) for r in shadows)
    return n + len(trained) * (cfg.grad_norm + cfg.update_ratio + 2 * cfg.fidelity)
