"""`lptrain.recipes`: precision recipes, public face of `lptrain.nn.recipe` (the types),
`lptrain.nn.catalog` (the named recipes) and `lptrain.nn.resolve` (dict / YAML / name)."""

from lptrain.nn.catalog import get, names
from lptrain.nn.recipe import GEMMS, GemmRecipe, Recipe, RecipeError
from lptrain.nn.resolve import from_dict, load, resolve

__all__ = [
    "GEMMS",
    "GemmRecipe",
    "Recipe",
    "RecipeError",
    "from_dict",
    "get",
    "load",
    "names",
    "resolve",
]
