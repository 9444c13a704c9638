"""lptrain.lora: adapters on a low-precision base (LoRA, L4Q) and their exports.

    import lptrain.lora as lora
    lora.apply(model, lora.AdapterConfig(kind="lora", r=8, alpha=16, base="int4"))
    lora.apply(model, lora.AdapterConfig(kind="l4q", r=8, bits=4, group_size=128))
    lora.save_peft(model, "adapter/")  # peft's format, both ways (plain LoRA)

`LoRALinear` (peft's conventions; frozen base kept as is or stored quantized in a
`QuantizedLinear`), `L4QLinear` (algorithms.md §6, custom backward with recomputation) and
`QuantizedLinear` (frozen low-precision storage, the deployable layer of an export).
"""

from lptrain.lora.apply import (
    KINDS,
    AdapterConfig,
    AdapterConfigError,
    adapter_layers,
    apply,
    base_bytes_per_param,
    merge,
    unmerge,
)
from lptrain.lora.chunked import FrozenLinearFunction, frozen_linear, row_chunks
from lptrain.lora.l4q import L4QFunction, L4QLinear, l4q_init_step
from lptrain.lora.layer import BASES, LoRALinear
from lptrain.lora.peft_io import load_peft, read_peft, save_peft
from lptrain.lora.quantized import FORMATS, QuantizedLinear

__all__ = [
    "BASES",
    "FORMATS",
    "KINDS",
    "AdapterConfig",
    "AdapterConfigError",
    "FrozenLinearFunction",
    "L4QFunction",
    "L4QLinear",
    "LoRALinear",
    "QuantizedLinear",
    "adapter_layers",
    "apply",
    "base_bytes_per_param",
    "frozen_linear",
    "l4q_init_step",
    "load_peft",
    "merge",
    "read_peft",
    "row_chunks",
    "save_peft",
    "unmerge",
]
