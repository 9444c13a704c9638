"""lptrain.nn: the drop-in low-precision Linear, its backends and model conversion.

Recipes (types, named catalog, dict/YAML form) are public as `lptrain.recipes`.
"""

from lptrain.nn.convert import (
    Conv1D,
    ConversionSummary,
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
from lptrain.nn.observe import disable_quantization, stats_window
from lptrain.nn.recipe import GEMMS, GemmRecipe, Recipe, RecipeError

__all__ = [
    "GEMMS",
    "ConversionSummary",
    "Conv1D",
    "GemmRecipe",
    "Linear",
    "Recipe",
    "RecipeError",
    "collect_stats",
    "convert",
    "disable_quantization",
    "layer_stats",
    "load_quantizer_state",
    "quantized_layers",
    "quantizer_state",
    "seed_quantizers",
    "set_amax_reduce",
    "stats_window",
    "unconvert",
]
