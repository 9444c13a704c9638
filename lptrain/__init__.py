"""lptrain: low-precision (FP8 / FP4 / INT16 DFP) training for PyTorch.

`lptrain.numerics` holds the element formats, rounding, scaling, Hadamard and DFP math;
`lptrain.nn` the drop-in Linear, named recipes and model conversion; `lptrain.train` the
DeepSpeed trainer and its command line.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import lptrain.numerics` does not pay for the nn package.
    if name in ("convert", "unconvert"):
        from lptrain import nn

        return getattr(nn, name)
    if name == "recipes":
        import lptrain.recipes as recipes

        return recipes
    raise AttributeError(f"module 'lptrain' has no attribute {name!r}")
