"""lptrain: low-precision (FP8 / FP4 / INT16 DFP) training for PyTorch.

The libraries (no trainer needed): `lptrain.numerics` the element formats, rounding, scaling,
Hadamard and DFP math; `lptrain.nn` the drop-in Linear, named recipes and `convert`;
`lptrain.qat` LSQ and bit switching; `lptrain.lora` LoRA and L4Q adapters. The trainer, from
the bottom of its stack up: `config`, `data`, `models`, `distributed`, `checkpoint`, `observe`,
`trainer` and `export`, `cli` (docs/layout.md; the order is enforced by .importlinter).
"""

from lptrain import recipes
from lptrain.errors import ConfigError
from lptrain.nn import convert, unconvert

__version__ = "0.1.0"

__all__ = ["ConfigError", "convert", "recipes", "unconvert"]
