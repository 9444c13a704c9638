"""lptrain.nn: the drop-in low-precision Linear, named recipes and model conversion."""

from lptrain.nn import recipes
from lptrain.nn.convert import (
    collect_stats,
    convert,
    layer_stats,
    load_quantizer_state,
    quantized_layers,
    quantizer_state,
    seed_quantizers,
    set_amax_reduce,
    unconvert,
)
from lptrain.nn.linear import Linear
from lptrain.nn.recipe import GEMMS, GemmRecipe, Recipe, RecipeError

__all__ = [
    "GEMMS",
    "GemmRecipe",
    "Linear",
    "Recipe",
    "RecipeError",
    "collect_stats",
    "convert",
    "layer_stats",
    "load_quantizer_state",
    "quantized_layers",
    "quantizer_state",
    "recipes",
    "seed_quantizers",
    "set_amax_reduce",
    "unconvert",
]
