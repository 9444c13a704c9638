"""LoRA adapters in peft's on-disk format, both ways, where the math is the same (plain LoRA:
y = base(x) + (alpha/r)·B·A·dropout(x); not rsLoRA, DoRA or per-layer ranks).

peft writes `adapter_config.json` and `adapter_model.safetensors` whose keys are
`base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), the
adapter name stripped. lptrain's LoRALinear holds the same tensors as `lora_A` / `lora_B`.
peft itself is not needed for either direction. Module paths are those of the model peft
wraps: for lptrain's wrapper of a Hugging Face model (lptrain/models/hf.py), the transformers
model inside it (`peft_root`), so the adapter loads onto the plain model with peft.

An adapter fits the base it was trained on: B·A learned to correct an int4 base's rounding
is not the update a float base needs. `lptrain_base.json` beside the adapter records the
base's storage (format and group size); peft never reads it (adapter_config.json stays
peft's own: peft warns about a key it does not know), and `load_peft` warns when the
model's base is stored otherwise.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from lptrain.lora.layer import LoRALinear

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
BASE_RECORD = "lptrain_base.json"


def peft_module(model: nn.Module) -> nn.Module:
    """The module peft wraps for `model`: a wrapper names the attribute that holds it
    (`peft_root`, lptrain/models/hf.py's HFCausalLM: the transformers model); else the model."""
    root = getattr(model, "peft_root", None)
    return getattr(model, root) if root else model


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers by their path in the module peft wraps."""
    return {n: m for n, m in peft_module(model).named_modules() if isinstance(m, LoRALinear)}


def _storage(m: LoRALinear) -> tuple[str, int | None]:
    """How the layer's frozen base is stored: (format, group size where it has one)."""
    return m.base_format, m.group_size if m.base_format == "int4" else None


def _describe(fmt: str, group: int | None) -> str:
    if fmt == "none":
        return "none (the float weights)"
    return f"{fmt}, group {group}" if group else fmt


def save_peft(model: nn.Module, out_dir: str | os.PathLike, base_model: str | None = None) -> Path:
    """Write the model's LoRA adapters as a peft adapter directory (loads with
    `PeftModel.from_pretrained(base, out_dir)`)."""
    from safetensors.torch import save_file  # optional dependency (the train extra)

    layers = _lora_layers(model)
    if not layers:
        raise ValueError("save_peft: the model has no lptrain LoRA layers")
    ranks = {(m.r, m.lora_alpha) for m in layers.values()}
    drops = {getattr(m.lora_dropout, "p", 0.0) for m in layers.values()}
    storages = {_storage(m) for m in layers.values()}
    if len(ranks) != 1 or len(drops) != 1 or len(storages) != 1:
        raise ValueError(
            "save_peft: peft's format needs one r, alpha, dropout and base storage for all layers"
        )
    (r, alpha), (dropout,), ((fmt, group),) = ranks.pop(), drops, storages
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().float().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    record = {"base_storage": {"format": fmt, "group_size": group}}
    (out / BASE_RECORD).write_text(json.dumps(record) + "\n")
    return out


def read_peft(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file  # optional dependency (the train extra)

    d = Path(adapter_dir)
    if not (d / CONFIG).is_file():
        raise FileNotFoundError(f"{d}: no {CONFIG} (not a peft adapter directory)")
    config = json.loads((d / CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{d}: peft_type {config.get('peft_type')!r}, only LORA loads")
    for key, plain in (("use_rslora", False), ("use_dora", False), ("fan_in_fan_out", False)):
        if config.get(key, plain) != plain:
            raise ValueError(f"{d}: {key}={config[key]} is not plain LoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{d}: per-layer rank/alpha patterns are not supported")
    return config, load_file(str(d / WEIGHTS))


@torch.no_grad()
def load_peft(model: nn.Module, adapter_dir: str | os.PathLike) -> nn.Module:
    """Copy a peft LoRA adapter into the model's LoRALinear layers (same r and alpha); warn
    when the adapter was trained on a base stored otherwise than this model's."""
    config, tensors = read_peft(adapter_dir)
    layers = _lora_layers(model)
    _warn_other_base(adapter_dir, layers)
    for name, m in layers.items():
        if (m.r, float(m.lora_alpha)) != (config["r"], float(config["lora_alpha"])):
            raise ValueError(
                f"{name}: adapter has r={config['r']}, alpha={config['lora_alpha']}; "
                f"layer has r={m.r}, alpha={m.lora_alpha}"
            )
        for part in ("lora_A", "lora_B"):
            key = f"{PREFIX}{name}.{part}.weight"
            if key not in tensors:
                raise KeyError(f"{adapter_dir}: no tensor {key}")
            target = getattr(m, part)
            if tuple(tensors[key].shape) != tuple(target.shape):
                raise ValueError(
                    f"{key}: shape {tuple(tensors[key].shape)} != {tuple(target.shape)}"
                )
            target.copy_(tensors[key])
    extra = {k for k in tensors if k.rsplit(".", 2)[0].removeprefix(PREFIX) not in layers}
    if extra:
        raise ValueError(f"{adapter_dir}: adapters for layers the model lacks: {sorted(extra)[:3]}")
    return model


def _warn_other_base(adapter_dir, layers: dict[str, LoRALinear]) -> None:
    """A warning naming both storages when the adapter's recorded base (lptrain_base.json;
    absent for an adapter peft wrote: nothing to compare) is not this model's."""
    path = Path(adapter_dir) / BASE_RECORD
    if not path.is_file():
        return
    try:
        rec = json.loads(path.read_text())["base_storage"]
        trained = (rec["format"], rec.get("group_size"))
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: malformed (expected a base_storage format)") from None
    here = {_storage(m) for m in layers.values()}
    others = sorted(_describe(*s) for s in here if s != trained)
    if others:
        warnings.warn(
            f"{adapter_dir}: the adapter was trained on a base stored as {_describe(*trained)}; "
            f"this model's base is stored as {', '.join(others)}: B·A corrects its own base's "
            "rounding, so the outputs (and loss) differ from the trained model's",
            stacklevel=3,
        )
