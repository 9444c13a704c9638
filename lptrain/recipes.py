"""`lptrain.recipes`: the named precision recipes (an alias of `lptrain.nn.recipes`)."""

from lptrain.nn.recipes import (  # noqa: F401
    GemmRecipe,
    Recipe,
    RecipeError,
    from_dict,
    get,
    load,
    names,
    resolve,
)
