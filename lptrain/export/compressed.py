"""`lptrain export RUN_DIR --format compressed-tensors`: the fine-tuned model as a
`transformers` directory whose linear layers stay quantized, in the format of the
`compressed-tensors` library (`quantization_config` in config.json, `quant_method:
compressed-tensors`). `AutoModelForCausalLM.from_pretrained` loads it without lptrain; vLLM
reads the format on GPUs (not tested here). Needs a base loaded from a Hugging Face directory.

How each folded layer (a `QuantizedLinear`, lptrain/qat/quantized.py) is stored. compressed-
tensors dequantizes W = (q - z)·s per group with the integer code q in [-2^(b-1), 2^(b-1)-1]:

* int4 / int8 base, LSQ weights (W = s·I): `pack-quantized`, symmetric, per group or
  channel: b-bit codes packed into int32 + s.
* L4Q, LSQ+ weights (W = s·I + β): `naive-quantized`, asymmetric with a float zero point
  z = -β/s: one int8 per code + s + z.
* fp8 base (E4M3 + a scale per row): `float-quantized` per channel: E4M3 codes + s.
* LSQ input quantizer (per tensor): the scheme's `input_activations`, static, per tensor: s
  (+ z for LSQ+'s offset or an unsigned grid).
* bf16 and nvfp4 bases, GPT-2's Conv1D: dense float32, and the report says why (nvfp4:
  compressed-tensors 0.20.1 decompresses it to bf16 in any model, and a float32 model's
  forward then fails on the dtype mismatch).

The zero point: compressed-tensors packs only integer zero points, and L4Q's learned offset β
is any float, so an L4Q layer goes to the unpacked format (1 byte per code, not b/8) and keeps
its offset exactly rather than being re-quantized. A precision recipe's quantized GEMMs
cannot be expressed (as with `--format hf`): the weights stay quantized, the GEMMs run in
float32. The export measures its own validation loss reloaded by `transformers`; the
difference to the int export comes from computing (q - z)·s where lptrain computes s·q + β,
and from the GEMMs (docs/finetune.md has the measured bound).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.errors import ConfigError
from lptrain.export import standalone, to_hf
from lptrain.models import hf as hf_models
from lptrain.nn.select import set_module
from lptrain.qat import QuantizedLinear
from lptrain.qat.layers import is_hf_conv1d

REPORT = "lptrain_compressed.json"  # how each layer was stored, and the measured losses
PACKED, UNPACKED, FLOAT = "pack-quantized", "naive-quantized", "float-quantized"


@dataclass
class Stored:
    """One layer as compressed-tensors stores it: the quantization scheme's arguments (the
    fields of its QuantizationArgs), the format, and the parameters that go with them."""

    weights: dict
    format: str
    scale: torch.Tensor  # (out, groups) or (out, 1)
    zero_point: torch.Tensor | None = None
    inputs: dict | None = None
    input_scale: torch.Tensor | None = None
    input_zero_point: torch.Tensor | None = None

    def describe(self) -> str:
        w = self.weights
        kind = "fp8 e4m3" if w["type"] == "float" else f"int{w['num_bits']}"
        per = f"group {w['group_size']}" if w["strategy"] == "group" else "channel"
        text = f"{self.format} {kind} per {per}"
        if not w["symmetric"]:
            text += " + float zero point"
        if self.inputs is not None:
            text += f", int{self.inputs['num_bits']} inputs per tensor"
        return text


def _zero_point(step: torch.Tensor, offset: torch.Tensor | None, shift: int):
    """z with s·(I + shift - z) = s·I + β: z = shift - β/s (None: symmetric, z = 0)."""
    if offset is None and shift == 0:
        return None
    z = torch.full_like(step, float(shift))
    return z if offset is None else z - offset / step


def _integer(q: QuantizedLinear) -> Stored:
    """int4/int8 bases and the affine codes of L4Q / LSQ: codes in [n, n + 2^b - 1], n <= 0,
    lie in compressed-tensors' signed grid as they are (lptrain's weight grids are signed)."""
    z = _zero_point(q.step, q.offset, 0)
    channel = q.group_size == q.in_features
    weights = {
        "num_bits": q.bits,
        "type": "int",
        "symmetric": z is None,
        "strategy": "channel" if channel else "group",
        "group_size": None if channel else q.group_size,
    }
    if z is not None:
        weights["zp_dtype"] = torch.float32
    return Stored(weights, PACKED if z is None else UNPACKED, q.step, z)


def _fp8(q: QuantizedLinear) -> Stored:
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    return Stored(weights, FLOAT, q.scale)


def _inputs(q: QuantizedLinear, stored: Stored) -> None:
    """The LSQ input quantizer: a static per-tensor step; an unsigned grid [0, 2^b - 1] is
    compressed-tensors' signed one shifted by -2^(b-1), LSQ+'s offset a float zero point."""
    iq = q.input_quantizer
    shift = 0 if iq.signed else -(2 ** (iq.bits - 1))
    step = iq.step.detach().float().reshape(1)
    offset = iq.offset.detach().float().reshape(1) if iq.offset is not None else None
    z = _zero_point(step, offset, shift)
    stored.inputs = {"num_bits": iq.bits, "type": "int", "symmetric": z is None,
                     "strategy": "tensor", "dynamic": False}  # fmt: skip
    if z is not None:
        stored.inputs["zp_dtype"] = torch.float32
    stored.input_scale, stored.input_zero_point = step, z


def plan(q: QuantizedLinear) -> Stored | str:
    """How compressed-tensors stores `q`, or why it cannot (the layer is written dense)."""
    if q.fmt in ("int4", "int8", "affine"):
        stored = _integer(q)
    elif q.fmt == "fp8":
        stored = _fp8(q)
    elif q.fmt == "bf16":
        return "dense float32: a bf16 weight is not a quantization format"
    elif q.fmt == "nf4":
        return "dense float32: compressed-tensors has no NF4 format (bitsandbytes serves NF4)"
    else:  # nvfp4: its nvfp4-pack-quantized decompresses to bf16 whatever the model's dtype
        return (
            f"dense float32: compressed-tensors 0.20 decompresses {q.fmt} to bf16, which the "
            "float32 model cannot run"
        )
    if q.input_quantizer is not None:
        _inputs(q, stored)
    return stored


# -- writing ------------------------------------------------------------------------------


def _library():
    try:
        import compressed_tensors  # noqa: F401  optional dependency (the ct extra)
    except ImportError:
        raise ConfigError(
            "--format",
            "compressed-tensors needs the compressed-tensors package (the ct extra: "
            "pip install 'lptrain[ct]')",
        ) from None


def _replace(hf: nn.Module) -> tuple[dict[str, Stored], dict[str, str]]:
    """Every QuantizedLinear of `hf` replaced by a float layer holding its deployable weight;
    ({layer: Stored} for compressed-tensors to quantize back, {layer: how it is stored})."""
    skeleton = hf_models.skeleton(hf.config)
    stored, how = {}, {}
    for name, q in list(hf.named_modules()):
        if not isinstance(q, QuantizedLinear):
            continue
        slot = skeleton.get_submodule(name)
        set_module(hf, name, to_hf.plain_layer(q, slot, name))
        if is_hf_conv1d(slot):
            how[name] = "dense float32: compressed-tensors quantizes no Conv1D (GPT-2)"
            continue
        s = plan(q)
        how[name] = s if isinstance(s, str) else s.describe()
        if not isinstance(s, str):
            stored[name] = s
        if q.recipe_layer is not None:
            how[name] += "; the precision recipe's GEMMs are not expressible (float32 GEMM)"
    return stored, how


def _config(stored: dict[str, Stored]):
    """One config group per distinct scheme, its targets the exact layer names."""
    from compressed_tensors.quantization import (  # optional dependency (the ct extra)
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    groups: dict[str, tuple[Stored, list[str]]] = {}
    for name, s in stored.items():
        key = json.dumps([s.weights, s.inputs, s.format], default=str, sort_keys=True)
        groups.setdefault(key, (s, []))[1].append(name)
    schemes = {}
    for i, (s, names) in enumerate(groups.values()):
        inputs = QuantizationArgs(**s.inputs) if s.inputs is not None else None
        schemes[f"group_{i}"] = QuantizationScheme(
            targets=names, weights=QuantizationArgs(**s.weights), input_activations=inputs,
            format=s.format,
        )  # fmt: skip
    return QuantizationConfig(config_groups=schemes, quantization_status="frozen")


@torch.no_grad()
def _set_parameters(hf: nn.Module, stored: dict[str, Stored]) -> None:
    """The scales and zero points apply_quantization_config made room for, set to ours; the
    compressor then recomputes each code as round(W/s + z) from the dequantized W, which
    gives back the stored code (W is s·(q - z) up to rounding far below 1/2)."""
    for name, s in stored.items():
        m = hf.get_submodule(name)
        m.weight_scale.copy_(s.scale.reshape(m.weight_scale.shape))
        if s.zero_point is not None:
            m.weight_zero_point.copy_(s.zero_point.reshape(m.weight_zero_point.shape))
        if s.input_scale is not None:
            m.input_scale.copy_(s.input_scale.reshape(m.input_scale.shape))
        if s.input_zero_point is not None:
            m.input_zero_point.copy_(s.input_zero_point.reshape(m.input_zero_point.shape))


def write(model: nn.Module, tok, tmp: Path) -> dict[str, str]:
    """Write the folded HF model `model` (an HFCausalLM) to `tmp`; {layer: how it is stored}."""
    if type(model).__name__ != "HFCausalLM":
        raise ConfigError(
            "--format",
            "compressed-tensors needs a base loaded from a Hugging Face directory (init.from)",
        )
    _library()
    from compressed_tensors.compressors import ModelCompressor  # optional (the ct extra)
    from compressed_tensors.quantization import apply_quantization_config

    hf = model.model
    stored, how = _replace(hf)
    if not stored:  # a plain transformers directory: that is --format hf
        reasons = sorted(set(how.values())) or ["no layer was folded"]
        raise ConfigError("--format", f"no layer can be stored quantized ({reasons[0]}); "
                          "use --format hf")  # fmt: skip
    lpnn.unconvert(model)
    apply_quantization_config(hf, _config(stored), show_progress=False)
    _set_parameters(hf, stored)
    compressor = ModelCompressor.from_pretrained_model(hf)
    compressor.compress_model(hf)
    hf.save_pretrained(str(tmp))
    compressor.update_config(str(tmp))  # quantization_config into config.json
    standalone.copy_hf_tokenizer(tok, tmp)
    return how


def write_report(tmp: Path, how: dict[str, str], losses: dict) -> None:
    report = {"layers": how, "val_loss": losses}
    (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")


def summary(how: dict[str, str]) -> list[str]:
    """One line per way of storing: how many layers, and how."""
    kinds = sorted(set(how.values()))
    return [f"compressed-tensors: {sum(v == k for v in how.values())} layers {k}" for k in kinds]
