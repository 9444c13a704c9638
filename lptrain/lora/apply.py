"""`apply(model, cfg)`: swap target linear layers for LoRA or L4Q layers and freeze the rest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

from torch import nn

from lptrain.lora.l4q import L4QLinear
from lptrain.lora.layer import BASES, LoRALinear
from lptrain.lora.quantized import QuantizedLinear
from lptrain.qat.layers import select

log = logging.getLogger("lptrain")
KINDS = ("lora", "l4q")


class AdapterConfigError(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class AdapterConfig:
    """kind: lora | l4q. r, alpha (scaling alpha/r), dropout (LoRA only). targets / skip:
    module-name globs (full dotted name or its last part). LoRA: `base` storage of the frozen
    weight (none | bf16 | fp8 | int8 | int4 | nvfp4) and `base_group_size` (int4). L4Q:
    `bits` (2-8) and `group_size` (inputs per step/offset group)."""

    kind: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    base: str = "none"
    base_group_size: int = 64
    bits: int = 4
    group_size: int = 128

    def __post_init__(self):
        if self.kind not in KINDS:
            raise AdapterConfigError("kind", f"{self.kind!r} is not one of {KINDS}")
        if self.r < 1:
            raise AdapterConfigError("r", f"must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.base not in BASES:
            raise AdapterConfigError("base", f"{self.base!r} is not one of {BASES}")
        if not 2 <= self.bits <= 8:
            raise AdapterConfigError("bits", f"must be in 2..8, got {self.bits}")
        for name in ("group_size", "base_group_size"):
            if getattr(self, name) < 1:
                raise AdapterConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.kind == "l4q" and self.base != "none":
            raise AdapterConfigError(
                "base", "l4q quantizes W0 + αBA itself and keeps W0 in high precision; drop base"
            )
        if self.kind == "l4q" and self.dropout:
            raise AdapterConfigError(
                "dropout", "l4q merges B·A into the quantized weight: no adapter-input dropout"
            )


def _make(cfg: AdapterConfig, layer: nn.Module, name: str) -> nn.Module:
    try:
        if cfg.kind == "l4q":
            return L4QLinear(layer, cfg.r, cfg.alpha, cfg.bits, cfg.group_size)
        return LoRALinear(layer, cfg.r, cfg.alpha, cfg.dropout, cfg.base, cfg.base_group_size)
    except ValueError as exc:
        msg = str(exc)
        field_name = msg.split(":", 1)[0]
        if field_name == "group_size" and cfg.kind == "lora":
            field_name = "base_group_size"
        raise AdapterConfigError(field_name, f"{msg.split(': ', 1)[-1]} (layer {name})") from None


def apply(
    model: nn.Module, cfg: AdapterConfig | dict, log_fn: Callable[[str], None] | None = None
) -> nn.Module:
    """Freeze every parameter of `model`, then swap each target linear for an adapter layer
    (only the adapter tensors train). Returns the model."""
    cfg = AdapterConfig(**cfg) if isinstance(cfg, dict) else cfg
    chosen = list(select(model, cfg.targets, cfg.skip))
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
    what = f"l4q {cfg.bits} bits, group {cfg.group_size}" if cfg.kind == "l4q" else (
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
