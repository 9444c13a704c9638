"""`precision.recipe` and `precision.overrides`: resolved and checked once.

`precision.recipe` is a named recipe or an inline mapping. Each `precision.overrides` entry
becomes an `Override`: the layers it matches run its GEMMs (or one operand of them) as another
recipe runs them (`Recipe.take`). The converter applies the overrides in order to each layer's
recipe (models/converters.py); the guard applies them again on top of every fallback, so that
what a person set stays set (`pin`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from lptrain import recipes
from lptrain.errors import ConfigError
from lptrain.nn.select import globs, matches

if TYPE_CHECKING:
    from lptrain.config.schema import PrecisionConfig, TrainConfig  # schema -> finetune -> here

HIGH_PRECISION = ("fp32", "bf16")  # named recipes that convert nothing


def resolve_recipe(p: PrecisionConfig) -> recipes.Recipe:
    """The validated precision recipe (a name or an inline mapping), or a ConfigError."""
    return _recipe(p.recipe, "precision.recipe")


def _recipe(value: str | dict, key: str) -> recipes.Recipe:
    if isinstance(value, str):
        if value not in recipes.names():
            known = ", ".join(recipes.names())
            raise ConfigError(key, f"unknown recipe {value!r} (known: {known})")
        return recipes.get(value)
    try:
        return recipes.from_dict(value)
    except ValueError as exc:
        # from_dict names the bad field inside the recipe; prefix our own path.
        raise ConfigError(key, str(exc)) from None


@dataclass(frozen=True)
class Override:
    """One `precision.overrides` entry, resolved (`key` names it in messages)."""

    key: str  # precision.overrides[i]
    layers: tuple[str, ...]  # fnmatch globs on layer names
    gemms: tuple[str, ...]  # the GEMMs it changes, in GEMMS order
    operand: str | None  # None: the whole GEMM
    source: recipes.Recipe  # the recipe whose specs are taken

    def applies_to(self, layer: str) -> bool:
        return matches(layer, self.layers) is not None

    def apply(self, recipe: recipes.Recipe) -> recipes.Recipe:
        """`recipe` with this entry's GEMMs (or operand) taken from `source`; a ConfigError
        naming the entry when that is no valid recipe."""
        for gemm in self.gemms:
            try:
                recipe = recipe.take(self.source, gemm, self.operand)
            except recipes.RecipeError as exc:
                what = f"{gemm}.{self.operand}" if self.operand else gemm
                raise ConfigError(
                    f"{self.key}.{'operand' if self.operand else 'gemm'}",
                    f"{what} of {self.source.name} in {recipe.name} is no valid recipe ({exc})",
                ) from None
        return recipe


def resolve_overrides(p: PrecisionConfig) -> list[Override]:
    """Every `precision.overrides` entry resolved, or a ConfigError naming its key."""
    return [_override(o, f"precision.overrides[{i}]") for i, o in enumerate(p.overrides)]


def _override(o, key: str) -> Override:
    if o.recipe is None:
        raise ConfigError(f"{key}.recipe", "required: the recipe whose GEMM spec is taken")
    names = list(globs(o.gemm))
    gemms = list(recipes.GEMMS) if names == ["*"] else names
    for name in gemms:
        if name not in recipes.GEMMS:
            raise ConfigError(
                f"{key}.gemm", f"{name!r} is not a GEMM; they are {', '.join(recipes.GEMMS)} (or *)"
            )
    operands = sorted({op for pair in recipes.GEMMS.values() for op in pair})
    if o.operand is not None and o.operand not in operands:
        raise ConfigError(
            f"{key}.operand", f"{o.operand!r} is not an operand; they are {', '.join(operands)}"
        )
    if o.operand is not None:
        lacking = [g for g in gemms if o.operand not in recipes.GEMMS[g]]
        if names == ["*"]:  # every GEMM that has the operand
            gemms = [g for g in gemms if g not in lacking]
        elif lacking:
            a, b = recipes.GEMMS[lacking[0]]
            raise ConfigError(
                f"{key}.operand", f"{lacking[0]} has operands {a} and {b}, not {o.operand}"
            )
    ordered = tuple(g for g in recipes.GEMMS if g in gemms)
    return Override(key, globs(o.layers), ordered, o.operand, _recipe(o.recipe, f"{key}.recipe"))


def pin(layer: str, recipe: recipes.Recipe, overrides: Sequence[Override]) -> recipes.Recipe:
    """`recipe` with every override that matches `layer` applied, in order: the recipe a
    converted layer starts from, and what the guard's fallbacks keep of a person's choices."""
    for o in overrides:
        if o.applies_to(layer):
            recipe = o.apply(recipe)
    return recipe


def is_high_precision(p: PrecisionConfig) -> bool:
    return isinstance(p.recipe, str) and p.recipe in HIGH_PRECISION


def recipe_dict(cfg: TrainConfig) -> dict | None:
    """The full resolved precision recipe, every field, for the run config and logs."""
    if is_high_precision(cfg.precision):
        return None
    return resolve_recipe(cfg.precision).to_dict()
