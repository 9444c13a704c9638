"""`apply(model, cfg)`: swap target linear layers for LoRA or L4Q layers and freeze the rest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from lptrain.errors import ConfigError
from lptrain.lora.l4q import L4QLinear
from lptrain.lora.layer import BASES, LoRALinear
from lptrain.nn.select import DEFAULT_SKIP, ModuleFilter, set_module
from lptrain.qat.layers import select
from lptrain.qat.quantized import QuantizedLinear

log = logging.getLogger("lptrain")
KINDS = ("lora", "l4q")


class AdapterConfigError(ConfigError):
    """An adapter setting is wrong: `field` names it (the trainer prefixes `adapters.`)."""


@dataclass(frozen=True)
class AdapterConfig:
    """type: lora | l4q (the YAML key `adapters.type`). r, alpha (scaling alpha/r), dropout
    (LoRA only). targets / skip: module-name globs (lptrain/nn/select.py). LoRA: `base`
    storage of the frozen weight (none | bf16 | fp8 | int8 | int4 | nvfp4 | nf4) and
    `base_group_size` (int4, nf4). L4Q: `bits` (2-8) and `group_size` (inputs per step/offset
    group)."""

    type: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: list(DEFAULT_SKIP))
    base: str = "none"
    base_group_size: int = 64
    bits: int = 4
    group_size: int = 128

    def __post_init__(self):
        if self.type not in KINDS:
            raise AdapterConfigError("type", f"{self.type!r} is not one of {KINDS}")
        if self.r < 1:
            raise AdapterConfigError("r", f"must be >= 1, got {self.r}")
        if not self.alpha > 0:  # NaN too
            raise AdapterConfigError(
                "alpha",
                f"must be > 0, got {self.alpha}: the adapter's output is scaled by alpha/r, so 0 "
                "fine-tunes nothing and a negative alpha only flips the sign B·A learns",
            )
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.base not in BASES:
            raise AdapterConfigError("base", f"{self.base!r} is not one of {BASES}")
        if not 2 <= self.bits <= 8:
            raise AdapterConfigError("bits", f"must be in 2..8, got {self.bits}")
        for name in ("group_size", "base_group_size"):
            if getattr(self, name) < 1:
                raise AdapterConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.type == "l4q" and self.base != "none":
            raise AdapterConfigError(
                "base", "l4q quantizes W0 + αBA itself and keeps W0 in high precision; drop base"
            )
        if self.type == "l4q" and self.dropout:
            raise AdapterConfigError(
                "dropout", "l4q merges B·A into the quantized weight: no adapter-input dropout"
            )


def _make(cfg: AdapterConfig, layer: nn.Module, name: str) -> nn.Module:
    try:
        if cfg.type == "l4q":
            return L4QLinear(layer, cfg.r, cfg.alpha, cfg.bits, cfg.group_size)
        return LoRALinear(layer, cfg.r, cfg.alpha, cfg.dropout, cfg.base, cfg.base_group_size)
    except ConfigError as exc:  # the layer names its own argument; the config calls it:
        field_name = (
            "base_group_size" if exc.field == "group_size" and cfg.type == "lora" else exc.field
        )
        raise AdapterConfigError(field_name, f"{exc.problem} (layer {name})") from None


def apply(
    model: nn.Module,
    cfg: AdapterConfig | dict,
    *,
    module_filter_fn: ModuleFilter | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> nn.Module:
    """Freeze every parameter of `model`, then swap each linear selected by (cfg.targets,
    cfg.skip, module_filter_fn) (lptrain/nn/select.py) for an adapter layer (only the adapter
    tensors train). Returns the model."""
    cfg = AdapterConfig(**cfg) if isinstance(cfg, dict) else cfg
    chosen = list(select(model, cfg.targets, cfg.skip, module_filter_fn))
    if not chosen:
        raise AdapterConfigError("targets", f"{cfg.targets} matches no linear layer")
    model.requires_grad_(False)
    for name, parent, child_name, layer in chosen:
        new = _make(cfg, layer, name)
        setattr(parent, child_name, new.train(layer.training))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    bpp = base_bytes_per_param(model)
    stored = f" ({bpp:.3f} bytes/param)" if bpp is not None else ""
    what = f"l4q {cfg.bits} bits, group {cfg.group_size}" if cfg.type == "l4q" else (
        f"lora, base {cfg.base}{stored}"
    )  # fmt: skip
    (log_fn or log.info)(
        f"adapters: {len(chosen)} layers, {what}, r={cfg.r}, alpha={cfg.alpha}; "
        f"{trainable} trainable of {total} parameters"
    )
    return model


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, L4QLinear)):
            yield name, m


def merge(model: nn.Module) -> nn.Module:
    for _, m in adapter_layers(model):
        if isinstance(m, LoRALinear):
            m.merge()
    return model


@torch.no_grad()
def merged_layer(m: LoRALinear | L4QLinear) -> nn.Module:
    """The layer that serves an adapter layer with its adapter added in. LoRA on a float base:
    the base with W + (α/r)BA; on a quantized base: the dequantized weight plus the adapter,
    re-quantized into the base's own format (round to nearest). L4Q: its integer export."""
    if isinstance(m, L4QLinear):
        return m.export()
    if m.base_format == "none":
        m.merge()
        return m.base_layer
    base = m.base_layer
    new = QuantizedLinear.from_weight(
        base.dequantize() + m.delta_weight().float(), base.fmt, bias=base.bias,
        group_size=base.group_size,
    )  # fmt: skip
    new.recipe_layer = base.recipe_layer
    return new


def merge_and_unload(model: nn.Module) -> nn.Module:
    """peft's name: every adapter layer replaced by `merged_layer`, in place (not reversible,
    unlike `merge`). Returns the model."""
    for name, m in list(adapter_layers(model)):
        set_module(model, name, merged_layer(m).eval())
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, m in adapter_layers(model):
        if isinstance(m, LoRALinear):
            m.unmerge()
    return model


def base_bytes_per_param(model: nn.Module) -> float | None:
    """Stored bytes per frozen base weight over the quantized LoRA bases (None if none)."""
    stored = params = 0
    for _, m in adapter_layers(model):
        if isinstance(m, LoRALinear) and isinstance(m.base_layer, QuantizedLinear):
            b = m.base_layer
            stored += b.bytes_per_param() * b.in_features * b.out_features
            params += b.in_features * b.out_features
    return stored / params if params else None
