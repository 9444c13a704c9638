"""The bridge to `lptrain.nn`: validate the precision section and convert the model.

`lptrain.nn` is imported lazily so that fp32/bf16 runs (which convert nothing) and config
validation of those recipes never depend on the quantized layer being importable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lptrain.train.config import ConfigError, PrecisionConfig

HIGH_PRECISION = ("fp32", "bf16")  # named recipes that convert nothing


def _nn():
    try:
        import lptrain.nn as lpnn

        lpnn.convert  # noqa: B018 - fail here, not mid-run, when the layer is missing
        return lpnn
    except (ImportError, AttributeError):
        return None


def is_high_precision(p: PrecisionConfig) -> bool:
    return isinstance(p.recipe, str) and p.recipe in HIGH_PRECISION


def resolve(p: PrecisionConfig) -> Any:
    """The recipe to hand to `lptrain.convert`: a validated name or a `Recipe` object."""
    if is_high_precision(p):
        return p.recipe
    lpnn = _nn()
    if lpnn is None:
        raise ConfigError(
            "precision.recipe",
            "quantized recipes need lptrain.nn.convert, which is not available in this install",
        )
    recipes = lpnn.recipes
    if isinstance(p.recipe, str):
        if p.recipe not in recipes.names():
            raise ConfigError(
                "precision.recipe",
                f"unknown recipe {p.recipe!r} (known: {', '.join(recipes.names())})",
            )
        return p.recipe
    try:
        return recipes.from_dict(p.recipe)
    except ValueError as exc:
        # from_dict names the bad field inside the recipe; prefix our own path.
        raise ConfigError("precision.recipe", str(exc)) from None


def recipe_dict(p: PrecisionConfig) -> dict | None:
    """The full resolved recipe for the run config and logs (None when convert is absent)."""
    lpnn = _nn()
    if lpnn is None:
        return None
    r = (
        lpnn.recipes.get(p.recipe)
        if isinstance(p.recipe, str)
        else lpnn.recipes.from_dict(p.recipe)
    )
    return r.to_dict()


def convert(model: nn.Module, p: PrecisionConfig, recipe: Any, seed: int, rank: int) -> nn.Module:
    """Swap eligible nn.Linear in place, then seed stochastic-rounding generators per rank."""
    if is_high_precision(p):
        return model
    lpnn = _nn()
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

    _nn().set_amax_reduce(model, reduce_max)


def quantizer_state(model: nn.Module) -> dict:
    lpnn = _nn()
    return lpnn.quantizer_state(model) if lpnn is not None else {}


def load_quantizer_state(model: nn.Module, state: dict) -> None:
    lpnn = _nn()
    if lpnn is not None and state:
        lpnn.load_quantizer_state(model, state)
