"""Module swap: `convert(model, recipe)` replaces eligible nn.Linear in place (before DeepSpeed
or any wrapper); `unconvert` restores plain nn.Linear with the same parameters."""

from __future__ import annotations

import fnmatch
import zlib
from typing import Iterable, Iterator

import torch
from torch import nn

from lptrain.nn.linear import Linear
from lptrain.nn.recipe import Recipe
from lptrain.nn.recipes import resolve


def _skipped(name: str, linear: nn.Linear, skip: Iterable[str], min_features: int) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(leaf, p) for p in skip):
        return True
    return min(linear.in_features, linear.out_features) < min_features


def _layer_seed(seed: int, name: str) -> int:
    # Stable across processes (never hash(), which is salted per process).
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def convert(
    model: nn.Module,
    recipe: str | Recipe | dict,
    *,
    skip: Iterable[str] = (),
    min_features: int = 0,
    backend: str = "auto",
    seed: int = 0,
) -> nn.Module:
    """Swap every eligible `nn.Linear` of `model` for `lptrain.nn.Linear`, in place.

    recipe: a name (`lptrain.recipes.names()`), a Recipe, an inline dict or a YAML path.
    skip: module-name globs (matched against the full dotted name and its last part, e.g.
    'lm_head'); min_features: skip layers whose smaller dimension is below this. Parameters,
    devices and dtypes are kept (the same tensors). Recipes that quantize nothing (fp32,
    bf16) leave the model unchanged. Returns the model.
    """
    recipe = resolve(recipe)
    skip = tuple(skip) if not isinstance(skip, str) else (skip,)
    if not recipe.quantizes:
        return model
    if isinstance(model, nn.Linear) and type(model) is nn.Linear:
        raise ValueError(
            "convert() swaps children in place; wrap a bare nn.Linear in a module "
            "or use lptrain.nn.Linear.from_float(linear, recipe)"
        )
    for name, parent, child_name, child in list(_linears(model)):
        if _skipped(name, child, skip, min_features):
            continue
        new = Linear.from_float(child, recipe, backend=backend, seed=_layer_seed(seed, name))
        new.train(child.training)
        setattr(parent, child_name, new)
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Replace every lptrain Linear by a plain nn.Linear holding the same parameters."""
    for _, parent, child_name, child in list(_modules_of(model, Linear)):
        with torch.device("meta"):
            plain = nn.Linear(child.in_features, child.out_features, child.bias is not None)
        plain.weight = child.weight
        plain.bias = child.bias
        plain.train(child.training)
        setattr(parent, child_name, plain)
    return model


def _modules_of(model: nn.Module, cls) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if isinstance(child, cls):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                yield full, parent, child_name, child


def _linears(model: nn.Module):
    for item in _modules_of(model, nn.Linear):
        if type(item[3]) is nn.Linear:  # not subclasses (ours, or other frameworks' layers)
            yield item


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            yield name, module


def seed_quantizers(model: nn.Module, seed: int, rank: int = 0) -> None:
    """Seed every layer's stochastic-rounding generator from (seed, rank, layer name)."""
    for name, layer in quantized_layers(model):
        layer.reseed(_layer_seed(seed * 65_537 + rank, name))


def set_amax_reduce(model: nn.Module, fn) -> None:
    """fn(amax) -> amax reduced (MAX) over the data-parallel group, for stateful scaling."""
    for _, layer in quantized_layers(model):
        layer.amax_reduce = fn


def quantizer_state(model: nn.Module) -> dict:
    """Per-rank state not (reliably) in the rank-0 module state_dict: generator states."""
    return {name: layer.get_extra_state() for name, layer in quantized_layers(model)}


def load_quantizer_state(model: nn.Module, state: dict) -> None:
    layers = dict(quantized_layers(model))
    missing = set(layers) - set(state)
    if missing:
        raise ValueError(f"quantizer state lacks layers: {sorted(missing)[:5]}")
    for name, layer in layers.items():
        layer.set_extra_state(state[name])


def collect_stats(model: nn.Module, every: int) -> None:
    for _, layer in quantized_layers(model):
        layer.collect_stats(every)


def layer_stats(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """The latest statistics of every layer: {layer: {'gemm.operand': {amax, ...}}}."""
    return {
        name: dict(layer.last_stats) for name, layer in quantized_layers(model) if layer.last_stats
    }
