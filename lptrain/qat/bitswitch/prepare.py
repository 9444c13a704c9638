"""`prepare(model, cfg)`: every eligible linear layer becomes a `BitSwitchLinear`;
`calibrate` sets every bit-width's input steps; `set_bits` picks the active bit-width(s)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from lptrain.errors import ConfigError
from lptrain.nn.select import DEFAULT_SKIP, ModuleFilter, set_module
from lptrain.qat.bitswitch import double_rounding as dr
from lptrain.qat.bitswitch.layer import BitSwitchLinear
from lptrain.qat.layers import select, weight_nk

log = logging.getLogger("lptrain")


class BitSwitchConfigError(ConfigError):
    """A bit-switching setting is wrong: `field` names it (the trainer prefixes `bitswitch.`)."""


@dataclass(frozen=True)
class BitSwitchConfig:
    """bits: candidate bit-widths (2-8, distinct; kept highest first; the highest is stored).
    rounding: nearest | shift. scale_grad: corrected | faithful (double_rounding.py).
    act_bits: quantize each layer's input with one LSQ step per bit-width; act_signed: the
    signed grid (transformer inputs are signed; the reference's ReLU CNNs used unsigned)."""

    bits: tuple[int, ...] = (8, 6, 4, 2)
    rounding: str = "nearest"
    scale_grad: str = "corrected"
    act_bits: bool = True
    act_signed: bool = True

    def __post_init__(self):
        bits = tuple(self.bits)
        if not bits:
            raise BitSwitchConfigError("bits", "give at least one bit-width")
        bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8]
        if bad:
            raise BitSwitchConfigError("bits", f"each must be an integer in 2..8, got {bad[0]!r}")
        if len(set(bits)) != len(bits):
            raise BitSwitchConfigError("bits", f"bit-widths must be distinct, got {list(bits)}")
        if self.rounding not in dr.ROUNDINGS:
            raise BitSwitchConfigError(
                "rounding", f"{self.rounding!r} is not one of {dr.ROUNDINGS}"
            )
        if self.scale_grad not in dr.SCALE_GRADS:
            raise BitSwitchConfigError(
                "scale_grad", f"{self.scale_grad!r} is not one of {dr.SCALE_GRADS}"
            )
        object.__setattr__(self, "bits", tuple(sorted(bits, reverse=True)))


def prepare(
    model: nn.Module,
    cfg: BitSwitchConfig | dict | None = None,
    *,
    targets: Iterable[str] = ("*",),
    skip: Iterable[str] = DEFAULT_SKIP,
    module_filter_fn: ModuleFilter | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> nn.Module:
    """Wrap every eligible linear selected by (targets, skip, module_filter_fn), in place.
    Weight scales are initialised from the weights here (before any DeepSpeed wrapper)."""
    cfg = BitSwitchConfig(**cfg) if isinstance(cfg, dict) else (cfg or BitSwitchConfig())
    n = 0
    chosen = list(select(model, targets, skip, module_filter_fn))
    if not chosen:
        raise BitSwitchConfigError(
            "targets", f"{list(targets)} minus skip {list(skip)} selects no layer"
        )
    for _name, parent, child_name, layer in chosen:
        m = BitSwitchLinear(
            layer, cfg.bits, rounding=cfg.rounding, scale_grad=cfg.scale_grad,
            act_bits=cfg.act_bits, act_signed=cfg.act_signed,
        )  # fmt: skip
        w = weight_nk(layer)
        m.to(w.device)
        m.weight_quantizer.init_from(w)
        setattr(parent, child_name, m.train(layer.training))
        n += 1
    act = f", inputs per bit-width ({'signed' if cfg.act_signed else 'unsigned'})"
    (log_fn or log.info)(
        f"bitswitch: {n} layers, double rounding {list(cfg.bits)} bits (stored "
        f"{cfg.bits[0]}), {cfg.rounding}, scale_grad {cfg.scale_grad}"
        + (act if cfg.act_bits else "")
    )
    return model


def bitswitch_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, BitSwitchLinear):
            yield name, m


def set_bits(model: nn.Module, bits: int | Mapping[str, int]) -> None:
    """One bit-width for every layer, or {layer name: bit-width} (HASB, mixed exports)."""
    for name, m in bitswitch_layers(model):
        m.set_bits(bits[name] if isinstance(bits, Mapping) else bits)


def active_bits(model: nn.Module) -> dict[str, int]:
    return {name: m.active for name, m in bitswitch_layers(model)}


@torch.no_grad()
def calibrate(model: nn.Module, *inputs, **kwargs) -> None:
    """Initialise every uncalibrated input step, bit-width by bit-width from the highest (each
    bit-width sees the activations of the model running at that bit-width), from one forward
    of `model(*inputs)` each, in eval mode. Call before `deepspeed.initialize`. The active
    bit-widths are restored afterwards."""
    layers = [m for _, m in bitswitch_layers(model) if m.input_quantizers is not None]
    if not layers:
        return
    was_training, before = model.training, active_bits(model)
    model.eval()
    for m in layers:
        m.calibrating = True
    try:
        for b in layers[0].bits:
            set_bits(model, b)
            model(*inputs, **kwargs)
    finally:
        for m in layers:
            m.calibrating = False
        set_bits(model, before)
        model.train(was_training)


def convert(model: nn.Module, bits: int | None = None) -> nn.Module:
    """Replace every BitSwitchLinear by its deployable layer at `bits`, in place; None keeps
    the int8 store, from which `switch_store` derives any candidate bit-width later (what an
    export holds). Returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, BitSwitchLinear):
            set_module(model, name, m.export(bits).eval())
    return model
