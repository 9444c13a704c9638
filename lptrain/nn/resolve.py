"""Recipes from their dict / YAML form or a name: `from_dict`, `load`, `resolve`.

The dict form is what `Recipe.to_dict()` writes and what a YAML recipe file or a run's
`precision.recipe` mapping holds. `base: <name>` starts from a named recipe and overrides only
what is given (operand specs merge field by field). Errors are `RecipeError`s whose message
starts with the field path, e.g. `grad_input.grad_output.format: unknown format 'fp9' ...`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import yaml

from lptrain.nn.catalog import get
from lptrain.nn.recipe import GEMMS, GemmRecipe, Recipe, RecipeError
from lptrain.numerics import QuantSpec
from lptrain.numerics.spec import SpecError


def _spec_from(d: Any, path: str) -> QuantSpec | None:
    if d is None:
        return None
    if isinstance(d, QuantSpec):
        return d
    if not isinstance(d, dict):
        raise RecipeError(f"{path}", f"expected a mapping of QuantSpec fields or null, got {d!r}")
    known = {f.name for f in fields(QuantSpec)}
    for k in d:
        if k not in known:
            raise RecipeError(f"{path}.{k}", f"unknown QuantSpec field; known: {sorted(known)}")
    kw = dict(d)
    if isinstance(kw.get("block_size"), list):
        kw["block_size"] = tuple(kw["block_size"])
    try:
        return QuantSpec(**kw)
    except SpecError as e:
        raise RecipeError(f"{path}.{e.field}", f"{e.problem}") from None


def _gemm_from(d: Any, gemm: str, base: GemmRecipe) -> GemmRecipe:
    a, b = GEMMS[gemm]
    if d is None:
        return GemmRecipe()
    if not isinstance(d, dict):
        raise RecipeError(
            f"{gemm}", f"expected a mapping with keys {a}, {b}, accumulate, chunk, overflow"
        )
    allowed = {a, b, "accumulate", "chunk", "overflow"}
    for k in d:
        if k not in allowed:
            raise RecipeError(f"{gemm}.{k}", f"unknown key; expected one of {sorted(allowed)}")
    spec_a = _merge_spec(base.a, d[a], f"{gemm}.{a}") if a in d else base.a
    spec_b = _merge_spec(base.b, d[b], f"{gemm}.{b}") if b in d else base.b
    acc = d.get("accumulate", base.accumulate)
    chunk = d.get("chunk", base.chunk)
    if not isinstance(chunk, int) or isinstance(chunk, bool):
        raise RecipeError(f"{gemm}.chunk", f"expected an int, got {chunk!r}")
    overflow = d.get("overflow", base.overflow)
    for key, v in (("accumulate", acc), ("overflow", overflow)):
        if not isinstance(v, str):
            raise RecipeError(f"{gemm}.{key}", f"expected a string, got {v!r}")
    return GemmRecipe(spec_a, spec_b, acc, chunk, overflow)


def _merge_spec(base: QuantSpec | None, d: Any, path: str) -> QuantSpec | None:
    if d is None or base is None or not isinstance(d, dict):
        return _spec_from(d, path)
    merged = base.to_dict()
    merged.update(d)
    return _spec_from(merged, path)


_TOP = {
    "name",
    "base",
    "description",
    "backward_operands",
    "wgrad_high_precision",
    "trust_mask",
    "signs",
    *GEMMS,
}


def from_dict(d: dict[str, Any], base: Recipe | None = None) -> Recipe:
    """Build a Recipe from its dict form; `base` (or d['base'], a recipe name) supplies defaults.

    Fields not given keep the base's values; operand specs merge field by field, so
    `{base: nvfp4, grad_weight: {grad_output: {rounding: nearest}}}` changes one field.
    """
    if not isinstance(d, dict):
        raise RecipeError("recipe", f"expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in _TOP:
            raise RecipeError(f"{k}", f"unknown recipe key; known: {sorted(_TOP)}")
    if "base" in d:
        try:
            base = get(d["base"])
        except ValueError as e:
            raise RecipeError("base", f"{e}") from None
    base = base or Recipe(name="custom")
    kw: dict[str, Any] = {}
    for g in GEMMS:
        kw[g] = _gemm_from(d[g], g, base.gemm(g)) if g in d else base.gemm(g)
    for key, typ in (
        ("backward_operands", str),
        ("signs", str),
        ("description", str),
        ("wgrad_high_precision", bool),
        ("trust_mask", bool),
        ("name", str),
    ):
        v = d.get(key, getattr(base, key) if key != "name" else d.get("name", base.name))
        if not isinstance(v, typ):
            raise RecipeError(f"{key}", f"expected {typ.__name__}, got {v!r}")
        kw[key] = v
    if "name" not in d and "base" in d:
        kw["name"] = f"{base.name}+custom"
    return Recipe(**kw)


def load(path: str) -> Recipe:
    """A recipe from a YAML file (the dict form; `base: <name>` to start from a named one)."""
    with open(path) as f:
        d = yaml.safe_load(f)
    return from_dict(d)


def resolve(recipe: str | Recipe | dict[str, Any]) -> Recipe:
    """A name, a Recipe, a dict (inline recipe) or a path to a .yaml file."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return from_dict(recipe)
    if isinstance(recipe, str) and recipe.endswith((".yaml", ".yml")):
        return load(recipe)
    return get(recipe)
