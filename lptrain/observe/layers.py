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

from lptrain import recipes
from lptrain.config.precision import is_high_precision, resolve_recipe
from lptrain.config.schema import MonitorConfig, TrainConfig
from lptrain.errors import ConfigError
from lptrain.nn import Linear, shadow, stats_window
from lptrain.nn.recipe import Recipe
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


# ---------------------------------------------------------------- per-block aggregation


def block_of(layer: str) -> str:
    """A layer's decoder block: its name up to the first numeric part (`layers.3.attn.wq` ->
    `layers.3`, `model.layers.3.mlp.up_proj` -> `model.layers.3`); a layer outside numbered
    blocks is its own (`lm_head`)."""
    parts = layer.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return layer


def block_key(key: str) -> str:
    """A per-layer key's per-block name: `quant/layers.3.attn.wq/output.input/sqnr_db` ->
    `quant/layers.3/output.input/sqnr_db` (and `shadow/<recipe>/...`, `grad/`, `weight/`)."""
    kind, _, rest = key.partition("/")
    if kind == "shadow":
        recipe, _, rest = rest.partition("/")
        kind = f"shadow/{recipe}"
    layer, _, tail = rest.partition("/")
    return f"{kind}/{block_of(layer)}/{tail}"


def _l2(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


# How a block's layers reduce, by the statistic's name: the worst layer for quality measures
# (lowest SQNR and cosine, highest saturation and underflow), the extremes for ranges, the
# block's own gradient norm (the norm of all its layers' gradients). Anything else: max.
BLOCK_REDUCE = {
    "sqnr_db": min,
    "cosine": min,
    "alignment": min,
    "scale_min": min,
    "min": min,
    "mean": lambda v: sum(v) / len(v),  # of the layers' means, unweighted
    "norm": _l2,
    "int32_overflows": sum,
}


def aggregate_blocks(row: dict) -> dict:
    """`monitor.aggregate: block`: a per-layer row reduced per decoder block (BLOCK_REDUCE; a
    NaN or missing value anywhere in a block makes the block's value NaN)."""
    groups: dict[str, list] = {}
    for key, value in row.items():
        if key != "step":
            groups.setdefault(block_key(key), []).append(value)
    out = {"step": row["step"]}
    for key, values in groups.items():
        if any(v is None or math.isnan(v) for v in values):
            out[key] = math.nan
        else:
            out[key] = BLOCK_REDUCE.get(key.rsplit("/", 1)[1], max)(values)
    return out


# ---------------------------------------------------------------- key counts


def _recipe_keys(recipe, wanted: list[str]) -> list[str]:
    """`<gemm>.<operand>/<stat>` of the `quant/` keys one layer of `recipe` gives per row,
    read off a 64x64 probe layer of that recipe (one emulated forward and backward on the
    CPU): they follow the recipe's operands, reused copies and scale kinds exactly, without a
    rule to keep in step. A shadow of `recipe` gives the same (nn/shadow.py records the same
    operands)."""
    probe = Linear(64, 64, bias=False, recipe=recipe, backend="emulated", seed=0)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with stats_window({"probe": probe}) as stats:
        probe(x).square().mean().backward()
    return [k[len("quant/probe/") :] for k in quant_metrics(stats, wanted, {"probe": probe})]


def keys_per_layer(recipe, wanted: list[str]) -> int:
    """The `quant/` keys one layer of `recipe` gives per row."""
    return len(_recipe_keys(recipe, wanted))


def key_names(
    layers: dict[str, nn.Module], trained: dict, cfg: MonitorConfig, shadows: tuple = ()
) -> list[str]:
    """The per-layer keys a row holds at most (every statistic due; before `aggregate`):
    `quant/` keys per quantizing layer and as many per shadow recipe, and per trained layer its
    gradient norm, update ratio and gradient fidelity (two)."""
    cache: dict[str, list[str]] = {}

    def suffixes(recipe) -> list[str]:
        name = repr(recipe.to_dict())
        if name not in cache:
            cache[name] = _recipe_keys(recipe, list(cfg.stats))
        return cache[name]

    names = []
    if cfg.stats:
        for name, layer in quantizing(layers).items():
            names += [f"quant/{name}/{k}" for k in suffixes(layer.recipe)]
            for r in shadows:
                names += [f"shadow/{r.name}/{name}/{k}" for k in suffixes(r)]
    weight = ["grad/{}/norm"] * cfg.grad_norm + ["weight/{}/update_ratio"] * cfg.update_ratio
    weight += ["grad/{}/cosine", "grad/{}/alignment"] * cfg.fidelity
    return names + [k.format(name) for name in trained for k in weight]


def key_count(
    layers: dict[str, nn.Module], trained: dict, cfg: MonitorConfig, shadows: tuple = ()
) -> int:
    """Keys of one row (layers.jsonl and W&B), per block with `monitor.aggregate: block`."""
    names = key_names(layers, trained, cfg, shadows)
    return len({block_key(k) for k in names}) if cfg.aggregate == "block" else len(names)


def key_count_line(
    layers: dict, trained: dict, cfg: MonitorConfig, shadows: tuple = (), moments: int = 0
) -> str:
    """What the trainer says at start (W&B suggests at most ~10,000 keys per project);
    `moments`: the optimizer-state keys (`optim/...`, per parameter, never aggregated)."""
    names = key_names(layers, trained, cfg, shadows)
    optim = f", {moments} of them optimizer-state keys (optim/...)" if moments else ""
    if cfg.aggregate == "block":
        blocks = {block_key(k) for k in names}
        n_blocks = len({block_of(n) for n in layers})
        return (
            f"monitor: {len(blocks) + moments} per-block keys per row (layers.jsonl, W&B), "
            f"{len(layers)} layers in {n_blocks} blocks ({len(names) + moments} per-layer keys "
            f"without monitor.aggregate: block{optim})"
        )
    return (
        f"monitor: {len(names) + moments} per-layer keys per row (layers.jsonl, W&B), "
        f"{len(layers)} layers{optim}"
    )
