"""The deploy fold: every trained layer as the module that serves it (docs/export.md).

`fold(model)` (public as `lptrain.export.fold`) replaces, in place, each LoRA layer by its base
with the adapter added in (a quantized base is re-quantized into its own format), each L4Q /
QAT / bit-switching layer by a `QuantizedLinear` holding integer codes; `layout(q)` is what
an export's JSON records of one such layer and `shell(layout)` the empty module it rebuilds
before the tensors load.
"""

from __future__ import annotations

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain import lora, qat
from lptrain.lora import L4QLinear, LoRALinear
from lptrain.numerics import nf4
from lptrain.qat import LSQQuantizer, QATLinear, QuantizedLinear, bitswitch
from lptrain.qat.bitswitch import BitSwitchLinear, SwitchInfo

# The export version: 2 has its own tokenizer and a manifest (validate.py); 3 packs integer
# codes at their bit-width (`code_bits` in each layout). Format 2 still loads (`legacy_code_bits`).
FORMAT = 3
READS = (2, 3)


# -- folding ------------------------------------------------------------------------------


def _how(m: nn.Module) -> str | None:
    """What the fold makes of one layer, for the export's record (None: left as is)."""
    if isinstance(m, L4QLinear):
        return f"l4q: {m.bits}-bit codes + step/offset per {m.group_size}"
    if isinstance(m, QATLinear):
        return "lsq: integer codes + step/offset"
    if isinstance(m, BitSwitchLinear):
        return (
            f"double rounding: int{m.bits[0]} codes + scale per row, switchable to {list(m.bits)}"
        )
    if isinstance(m, LoRALinear):
        if m.base_format == "none":
            return "merged into the float base weight"
        return f"merged into the dequantized weight and re-quantized to {m.base_layer.fmt}"
    return None


def fold(model: nn.Module) -> dict[str, str]:
    """Replace every trained layer by its deployable form, in place; {layer: how}. The three
    library converts in one call: adapters `lora.merge_and_unload`, QAT `qat.convert`, bit
    switching `qat.bitswitch.convert` (the int8 store)."""
    how = {name: what for name, m in model.named_modules() if (what := _how(m)) is not None}
    lora.merge_and_unload(model)
    qat.convert(model)
    bitswitch.convert(model)
    return how


@torch.no_grad()
# -- layouts (what the JSON records, and the empty modules it rebuilds) -------------------


def layout(q: QuantizedLinear) -> dict:
    iq = q.input_quantizer
    return {
        "fmt": q.fmt,
        "in_features": q.in_features,
        "out_features": q.out_features,
        "gemm": q.gemm,
        "bits": q.bits,
        "group_size": q.group_size,
        "n": q.n,
        "packed": q.fmt in ("int4", "int8", "affine") and q.codes.dtype == torch.uint8,
        "code_bits": q.code_bits if q.fmt in ("int4", "int8", "affine") else None,
        "offset": getattr(q, "offset", None) is not None,
        "bias": q.bias is not None,
        "recipe": q.recipe_layer.recipe.to_dict() if q.recipe_layer is not None else None,
        "recipe_bias": q.recipe_layer is not None and q.recipe_layer.bias is not None,
        "input_quantizer": None
        if iq is None
        else {"bits": iq.bits, "signed": iq.signed, "offset": iq.offset is not None},
        "bytes_per_param": round(q.bytes_per_param(), 6),
        "switch": q.switch.layout() if getattr(q, "switch", None) is not None else None,
    }


def shell(lay: dict) -> QuantizedLinear:
    """An empty QuantizedLinear with the buffers `lay` describes (load_state_dict fills it)."""
    i, o, fmt = lay["in_features"], lay["out_features"], lay["fmt"]
    q = QuantizedLinear(i, o, fmt, gemm=lay["gemm"])
    u8, f32 = torch.uint8, torch.float32
    if fmt == "bf16":
        q.register_buffer("weight_bf16", torch.zeros(o, i, dtype=torch.bfloat16))
    elif fmt == "fp8":
        q.register_buffer("codes", torch.zeros(o, i, dtype=u8))
        q.register_buffer("scale", torch.zeros(o, 1, dtype=f32))
    elif fmt == "nvfp4":
        q.register_buffer("codes", torch.zeros(o, i // 2, dtype=u8))
        q.register_buffer("block_scale", torch.zeros(o, i // 16, dtype=u8))
        q.register_buffer("global_scale", torch.zeros((), dtype=f32))
    elif fmt == "nf4":
        g = lay["group_size"]
        q.check_nf4(g)
        blocks = -(-(o * i // g) // nf4.SCALE_BLOCK)
        idx, scale_codes = torch.zeros(o, i, dtype=u8), torch.zeros(o, i // g, dtype=u8)
        q.set_nf4(idx, scale_codes, torch.zeros(blocks), torch.zeros(()), group_size=g)
    else:
        g = lay["group_size"]
        codes = torch.zeros(o, i, dtype=torch.int16)
        off = torch.zeros(o, i // g) if lay["offset"] else None
        q.set_affine(codes, torch.zeros(o, i // g), off, bits=lay["bits"], group_size=g, n=lay["n"],
                     code_bits=code_bits(lay))  # fmt: skip
        q.fmt = fmt
    if lay["bias"]:
        q.register_buffer("bias", torch.zeros(o))
    if lay["recipe"] is not None:
        layer = lpnn.Linear(i, o, lay["recipe_bias"], recipe=lay["recipe"])
        layer.register_parameter("weight", None)
        q.recipe_layer = layer.requires_grad_(False)
    if lay["input_quantizer"] is not None:
        iq = lay["input_quantizer"]
        q.input_quantizer = LSQQuantizer(
            iq["bits"], signed=iq["signed"], offset=iq["offset"], role="input"
        ).requires_grad_(False)
    if lay.get("switch"):  # absent in exports written before bit switching
        q.switch = SwitchInfo.from_layout(lay["switch"])
    return q


def code_bits(lay: dict) -> int:
    """The width each integer code occupies in the layer's `codes`: recorded since format 3;
    format 2 packed two 4-bit slots per byte when `packed` (bits <= 4) and used int8 otherwise."""
    if lay.get("code_bits") is not None:
        return lay["code_bits"]
    return 4 if lay["packed"] else 8
