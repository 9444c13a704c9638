"""`prepare(model, cfg)`: LSQ/LSQ+ quantization-aware training of every eligible linear layer.

Each layer becomes a `QATLinear` holding the original layer as `base` (its parameters, its
recipe if it is an `lptrain.nn.Linear`), a weight quantizer and optionally an input
(activation) quantizer. The weight stays trainable in full precision; the forward sees the
fake-quantized weight. Issue 13 (bit switching) plugs other weight quantizers into the same
wrapper: anything with `forward(w) -> ŵ`, `integer_codes(w)` and `dequantize_codes(q)`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from lptrain.errors import ConfigError
from lptrain.nn.select import DEFAULT_SKIP, ModuleFilter, set_module
from lptrain.qat.layers import features, keep_base_gemm, run_gemm, select, weight_nk
from lptrain.qat.lsq import GRANULARITIES
from lptrain.qat.quantized import QuantizedLinear
from lptrain.qat.quantizer import LSQQuantizer

log = logging.getLogger("lptrain")
METHODS = ("lsq", "lsq+")


class QATConfigError(ConfigError):
    """A QAT setting is wrong: `field` names it (the trainer prefixes its section)."""


@dataclass(frozen=True)
class QATConfig:
    """method: lsq | lsq+ (learnable offset). weight_bits 2-8, signed. weight_granularity:
    tensor | channel (per output row) | group (`group_size` inputs of a row). act_bits: None
    (weights only) or 2-8 for the layer inputs (per-tensor; signed unless act_signed=False)."""

    method: str = "lsq"
    weight_bits: int = 4
    weight_granularity: str = "channel"
    group_size: int = 128
    act_bits: int | None = None
    act_signed: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise QATConfigError("method", f"{self.method!r} is not one of {METHODS}")
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if bits is not None and not 2 <= bits <= 8:
                raise QATConfigError(name, f"must be in 2..8, got {bits}")
        if self.weight_granularity not in GRANULARITIES:
            raise QATConfigError(
                "weight_granularity", f"{self.weight_granularity!r} is not one of {GRANULARITIES}"
            )
        if self.group_size < 1:
            raise QATConfigError("group_size", f"must be >= 1, got {self.group_size}")


class QATLinear(nn.Module):
    """A linear layer trained through its quantizers: y = base_gemm(Q_x(x), Q_w(W))."""

    def __init__(
        self,
        base: nn.Module,
        weight_quantizer: nn.Module,
        input_quantizer: LSQQuantizer | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = features(base)
        self.base = base
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.calibrating = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.input_quantizer
        if q is not None:
            if not bool(q.initialized):
                # First training forward (or calibrate()): set the step from this batch. Not
                # in eval: evaluation never changes state.
                if not (self.training or self.calibrating):
                    raise RuntimeError(
                        "QATLinear: the input quantizer is not calibrated; run "
                        "lptrain.qat.calibrate(model, batch) or a training forward first"
                    )
                q.init_from(x)
            x = q(x)
        return run_gemm(self.base, x, self.weight_quantizer(weight_nk(self.base)))

    @torch.no_grad()
    def export(self) -> nn.Module:
        """The deployable layer: integer codes + step (+ offset) per group, the input quantizer
        and the base's recipe GEMMs kept; its forward equals this layer's eval forward bit for
        bit (the same dequantized values through the same GEMM)."""
        q = self.weight_quantizer
        w = weight_nk(self.base)
        out, inp = w.shape
        group = q.group_size if q.granularity == "group" else inp

        def per_row(t):  # (1,), (out, 1) or (out, G, 1) -> (out, G)
            t = t.detach().float()
            return (
                t.reshape(1, 1).expand(out, 1) if q.granularity == "tensor" else t.reshape(out, -1)
            )

        off = per_row(q.offset) if q.offset is not None else None
        m = QuantizedLinear(inp, out, "affine", gemm="full")
        m.set_affine(q.integer_codes(w), per_row(q.step), off, bits=q.bits, group_size=group, n=q.n)
        keep_base_gemm(m, self.base)
        if self.input_quantizer is not None:
            m.input_quantizer = copy.deepcopy(self.input_quantizer).requires_grad_(False)
        return m.to(w.device).train(self.training)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _weight_quantizer(cfg: QATConfig, layer: nn.Module, name: str) -> LSQQuantizer:
    w = weight_nk(layer)
    try:
        q = LSQQuantizer(
            cfg.weight_bits,
            granularity=cfg.weight_granularity,
            group_size=cfg.group_size,
            offset=cfg.method == "lsq+",
            shape=tuple(w.shape),
        )
    except ValueError as exc:  # "<field>: <problem>" from LSQQuantizer
        field, _, problem = str(exc).partition(": ")
        field = "weight_granularity" if field == "granularity" else field
        raise QATConfigError(field, f"{problem} (layer {name})") from None
    q.to(w.device)
    q.init_from(w)  # before any DeepSpeed wrapper (see quantizer.py)
    return q


def prepare(
    model: nn.Module,
    cfg: QATConfig | dict | None = None,
    *,
    targets: Iterable[str] = ("*",),
    skip: Iterable[str] = DEFAULT_SKIP,
    module_filter_fn: ModuleFilter | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> nn.Module:
    """Wrap every eligible linear (nn.Linear, lptrain.nn.Linear, HF Conv1D) selected by
    (targets, skip, module_filter_fn) (lptrain/nn/select.py) in a QATLinear, in place; returns
    the model. torchao's vocabulary: `prepare` trains, `convert` deploys."""
    cfg = QATConfig(**cfg) if isinstance(cfg, dict) else (cfg or QATConfig())
    done = []
    chosen = list(select(model, targets, skip, module_filter_fn))
    if not chosen:
        raise QATConfigError("targets", f"{list(targets)} minus skip {list(skip)} selects no layer")
    for name, parent, child_name, layer in chosen:
        wq = _weight_quantizer(cfg, layer, name)
        aq = None
        if cfg.act_bits is not None:
            aq = LSQQuantizer(
                cfg.act_bits, signed=cfg.act_signed, offset=cfg.method == "lsq+", role="input"
            ).to(wq.step.device)
        setattr(parent, child_name, QATLinear(layer, wq, aq).train(layer.training))
        done.append(name)
    act = f", inputs {cfg.act_bits} bits" if cfg.act_bits else ""
    gran = cfg.weight_granularity + (
        f" {cfg.group_size}" if cfg.weight_granularity == "group" else ""
    )
    (log_fn or log.info)(
        f"qat: {len(done)} layers, {cfg.method} weights {cfg.weight_bits} bits ({gran}){act}"
    )
    return model


def qat_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, QATLinear):
            yield name, m


@torch.no_grad()
def calibrate(model: nn.Module, *inputs, **kwargs) -> None:
    """Initialise every uncalibrated input quantizer from one forward of `model(*inputs)`.

    Runs in eval mode (lptrain layers use their state and change nothing) with only the
    quantizer inits recorded. Call it before `deepspeed.initialize`: later in-place edits of
    parameters are undone by ZeRO's fp32 master copy."""
    layers = [m for _, m in qat_layers(model) if m.input_quantizer is not None]
    if not layers:
        return
    was_training = model.training
    model.eval()
    for m in layers:
        m.calibrating = True
    try:
        model(*inputs, **kwargs)
    finally:
        for m in layers:
            m.calibrating = False
        model.train(was_training)


def convert(model: nn.Module) -> nn.Module:
    """Replace every QATLinear by its deployable layer (`QATLinear.export`: integer codes and
    steps), in place; torchao's order: `prepare`, train, `convert`. Returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QATLinear):
            set_module(model, name, m.export().eval())
    return model
