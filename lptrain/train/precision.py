"""The bridge to `lptrain.nn`: validate the precision section and convert the model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.train.config import ConfigError, PrecisionConfig

HIGH_PRECISION = ("fp32", "bf16")  # named recipes that convert nothing


def is_high_precision(p: PrecisionConfig) -> bool:
    return isinstance(p.recipe, str) and p.recipe in HIGH_PRECISION


def resolve(p: PrecisionConfig) -> Any:
    """The recipe to hand to `lptrain.convert`: a validated name or a `Recipe` object."""
    if isinstance(p.recipe, str):
        if p.recipe not in lpnn.recipes.names():
            raise ConfigError(
                "precision.recipe",
                f"unknown recipe {p.recipe!r} (known: {', '.join(lpnn.recipes.names())})",
            )
        return p.recipe
    try:
        return lpnn.recipes.from_dict(p.recipe)
    except ValueError as exc:
        # from_dict names the bad field inside the recipe; prefix our own path.
        raise ConfigError("precision.recipe", str(exc)) from None


def recipe_dict(p: PrecisionConfig) -> dict:
    """The full resolved recipe, every field, for the run config and logs."""
    r = resolve(p)
    return (lpnn.recipes.get(r) if isinstance(r, str) else r).to_dict()


def convert(model: nn.Module, p: PrecisionConfig, recipe: Any, seed: int, rank: int) -> nn.Module:
    """Swap eligible nn.Linear in place, then seed stochastic-rounding generators per rank."""
    if is_high_precision(p):
        return model
    model = lpnn.convert(
        model, recipe, skip=tuple(p.skip), min_features=p.min_features, backend=p.backend
    )
    lpnn.seed_quantizers(model, seed, rank)
    return model


def set_amax_reduce(model: nn.Module, p: PrecisionConfig, world: int) -> None:
    """Delayed-scaling amax must be MAX-reduced over data parallel ranks for equal scales."""
    if world <= 1 or is_high_precision(p):
        return
    import torch.distributed as dist

    def reduce_max(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    lpnn.set_amax_reduce(model, reduce_max)


def quantizer_state(model: nn.Module) -> dict:
    return lpnn.quantizer_state(model)


def load_quantizer_state(model: nn.Module, state: dict) -> None:
    if state:
        lpnn.load_quantizer_state(model, state)
