"""lptrain.numerics: formats, rounding, scaling, Hadamard, quantize, INT16 DFP.

Public API (names relied upon): get_format, Format, round_to_format, QuantSpec, quantize,
QuantizedTensor, hadamard, hadamard_matrix, and the DFP functions.
"""

from lptrain.numerics.codes import (
    decode,
    decode_table,
    encode,
    pack_bits,
    pack_nibbles,
    packed_bytes,
    unpack_bits,
    unpack_nibbles,
)
from lptrain.numerics.dfp import (
    DFPMatmulResult,
    DFPTensor,
    dfp_matmul,
    dfp_quantize,
    fake_quantize_dfp,
)
from lptrain.numerics.formats import Format, format_names, get_format
from lptrain.numerics.hadamard import TE_NVFP4_SIGNS, hadamard, hadamard_matrix, random_signs
from lptrain.numerics.quantize import QuantizedTensor, fake_quantize, quantize
from lptrain.numerics.rounding import round_to_format
from lptrain.numerics.spec import QuantSpec, SpecError
from lptrain.numerics.state import ScalingState
from lptrain.numerics.stats import QuantStats

__all__ = [
    "DFPMatmulResult",
    "DFPTensor",
    "Format",
    "QuantSpec",
    "QuantStats",
    "QuantizedTensor",
    "ScalingState",
    "SpecError",
    "TE_NVFP4_SIGNS",
    "decode",
    "decode_table",
    "dfp_matmul",
    "dfp_quantize",
    "encode",
    "fake_quantize",
    "fake_quantize_dfp",
    "format_names",
    "get_format",
    "hadamard",
    "hadamard_matrix",
    "pack_bits",
    "pack_nibbles",
    "packed_bytes",
    "quantize",
    "random_signs",
    "round_to_format",
    "unpack_bits",
    "unpack_nibbles",
]
