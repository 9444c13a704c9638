"""lptrain.qat: quantization-aware training with LSQ / LSQ+ (algorithms.md §5).

    import lptrain.qat as qat
    qat.prepare(model, qat.QATConfig(method="lsq", weight_bits=4, act_bits=8))
    qat.calibrate(model, first_batch)  # input steps, before DeepSpeed wraps the model

`lsq` is the functional quantizer (custom autograd), `LSQQuantizer` the module with its
learnable step (and offset), `QATLinear` the wrapper `prepare` puts around each linear layer,
`QuantizedLinear` the frozen low-precision layer (a LoRA base's storage, an export's layer).
Quantizer parameters carry `lptrain_role = "quantizer"` (`is_quantizer_param`): the trainer
gives them their own optimizer group without weight decay.
"""

from lptrain.qat.lsq import LSQFunction, bounds, grad_scale, lsq_fake_quantize, ste_reference
from lptrain.qat.prepare import (
    METHODS,
    QATConfig,
    QATConfigError,
    QATLinear,
    calibrate,
    convert,
    prepare,
    qat_layers,
)
from lptrain.qat.quantized import FORMATS, QuantizedLinear
from lptrain.qat.quantizer import LSQQuantizer, is_quantizer_param, mark_quantizer_params

__all__ = [
    "FORMATS",
    "LSQFunction",
    "LSQQuantizer",
    "METHODS",
    "QATConfig",
    "QATConfigError",
    "QATLinear",
    "QuantizedLinear",
    "bounds",
    "calibrate",
    "convert",
    "grad_scale",
    "is_quantizer_param",
    "lsq_fake_quantize",
    "mark_quantizer_params",
    "prepare",
    "qat_layers",
    "ste_reference",
]
