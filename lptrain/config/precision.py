"""`precision.recipe`: a named recipe or an inline mapping, resolved and checked once."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lptrain import recipes
from lptrain.errors import ConfigError

if TYPE_CHECKING:
    from lptrain.config.schema import PrecisionConfig, TrainConfig  # schema -> finetune -> here

HIGH_PRECISION = ("fp32", "bf16")  # named recipes that convert nothing


def resolve_recipe(p: PrecisionConfig) -> recipes.Recipe:
    """The validated precision recipe (a name or an inline mapping), or a ConfigError."""
    if isinstance(p.recipe, str):
        if p.recipe not in recipes.names():
            raise ConfigError(
                "precision.recipe",
                f"unknown recipe {p.recipe!r} (known: {', '.join(recipes.names())})",
            )
        return recipes.get(p.recipe)
    try:
        return recipes.from_dict(p.recipe)
    except ValueError as exc:
        # from_dict names the bad field inside the recipe; prefix our own path.
        raise ConfigError("precision.recipe", str(exc)) from None


def is_high_precision(p: PrecisionConfig) -> bool:
    return isinstance(p.recipe, str) and p.recipe in HIGH_PRECISION


def recipe_dict(cfg: TrainConfig) -> dict | None:
    """The full resolved precision recipe, every field, for the run config and logs."""
    if is_high_precision(cfg.precision):
        return None
    return resolve_recipe(cfg.precision).to_dict()
