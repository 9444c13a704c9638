"""lptrain.lora: adapters on a low-precision base (LoRA, L4Q) and their exports.

    import lptrain.lora as lora
    lora.apply(model, lora.AdapterConfig(type="lora", r=8, alpha=16, base="int4"))
    lora.apply(model, lora.AdapterConfig(type="l4q", r=8, bits=4, group_size=128))
    lora.save_peft(model, "adapter/")  # peft's format, both ways (plain LoRA)

`LoRALinear` (peft's conventions; frozen base kept as is or stored quantized in an
`lptrain.qat.QuantizedLinear`) and `L4QLinear` (algorithms.md §6, custom backward with
recomputation).
"""

from lptrain.lora.apply import (
    KINDS,
    AdapterConfig,
    AdapterConfigError,
    adapter_layers,
    apply,
    base_bytes_per_param,
    merge,
    merge_and_unload,
    merged_layer,
    unmerge,
)
from lptrain.lora.l4q import L4QFunction, L4QLinear, l4q_init_step
from lptrain.lora.layer import BASES, LoRALinear
from lptrain.lora.peft_io import load_peft, read_peft, save_peft

__all__ = [
    "BASES",
    "KINDS",
    "AdapterConfig",
    "AdapterConfigError",
    "L4QFunction",
    "L4QLinear",
    "LoRALinear",
    "adapter_layers",
    "apply",
    "base_bytes_per_param",
    "l4q_init_step",
    "load_peft",
    "merge",
    "merge_and_unload",
    "merged_layer",
    "read_peft",
    "save_peft",
    "unmerge",
]
