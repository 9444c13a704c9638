"""Recipe sections for fine-tuning: `init`, `qat`, `bitswitch`, `adapters` (typed, parsed by
schema.py).

    init:
      from: null          # an lptrain run dir, its checkpoints/ dir or one checkpoint tag dir,
                          # or a local Hugging Face model dir (needs transformers; no network)
    qat:                  # LSQ / LSQ+ quantization-aware training of every linear layer
      method: null        # null (off) | lsq | lsq+
      weight_bits: 4      # 2-8, signed grid
      weight_granularity: channel  # tensor | channel | group
      group_size: 128     # inputs per step with granularity: group
      act_bits: null      # null (weights only) or 2-8: the layer inputs, per-tensor
      act_signed: true
      skip: [lm_head]
    bitswitch:            # double-rounding bit switching (lptrain.qat.bitswitch; §7)
      bits: null          # null (off) or the candidate bit-widths, e.g. [8, 6, 4, 2]
      rounding: nearest   # nearest (round half to even) | shift (right shift, the ablation)
      scale_grad: corrected  # corrected (per-channel, exact) | faithful (the reference's)
      act_bits: true      # quantize layer inputs, one LSQ step per bit-width
      act_signed: true
      alrs_alpha: 0.1     # ALRS: quantizer-scale lr x alpha^k at the k-th bit-width (1: off)
      alrs_stop_bit: 0    # ALRS decays only bit-widths >= this
      distill: 0.0        # self-distillation from the highest bit-width, weight ramped to this
      eval_bits: null     # bit-width of evaluation and checkpoints (default: the highest)
      skip: [lm_head]
      hasb:               # Hessian-aware stochastic bit-switching (mixed precision)
        enabled: false
        sigma: 0.5        # switch probability sigma * (step+1)/steps after warmup_steps
        warmup_steps: 0
        hessian_iters: 7  # Hutchinson: at most this many Rademacher draws
        hessian_tol: 1.0e-3  # ... or stop when every layer's mean moves less (relative)
        hessian_batches: 1   # micro-batches of the first training batch the traces see
    adapters:
      type: null          # null (off) | lora | l4q
      r: 8                # 1 .. min(in, out) of every target layer
      alpha: 16.0         # scaling alpha / r; > 0
      dropout: 0.0        # lora only
      targets: ['*']      # module-name globs (full name or last part)
      skip: [lm_head]
      base: none          # lora: frozen base storage none | bf16 | fp8 | int8 | int4 | nvfp4 | nf4
      base_group_size: 64 # lora with base int4 or nf4: inputs per scale
      bits: 4             # l4q: 2-8
      group_size: 128     # l4q: inputs per step/offset group

The checks here run when the recipe is parsed (exit 2 with the key path before anything is
written); the layer-dependent ones (a group size that does not divide a layer) when the
converters run, also before the run directory is touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lptrain.config.precision import is_high_precision
from lptrain.errors import ConfigError
from lptrain.lora import AdapterConfig
from lptrain.qat import QATConfig
from lptrain.qat.bitswitch import BitSwitchConfig

if TYPE_CHECKING:
    from lptrain.config.schema import TrainConfig  # schema imports this module's sections


@dataclass(frozen=True)
class InitConfig:
    # `from` is a Python keyword: the field is `from_`, its YAML key `from` (schema.py aliases).
    from_: str | None = field(default=None, metadata={"key": "from"})


@dataclass(frozen=True)
class QATSection:
    # LSQ / LSQ+ quantization-aware training (lptrain.qat); null: off
    method: Literal["lsq", "lsq+"] | None = None
    weight_bits: int = 4  # 2-8, signed grid [-2^(b-1), 2^(b-1)-1]
    # one step per tensor, per output channel or per group of inputs
    weight_granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = 128  # inputs per step with weight_granularity group
    # null (weights only) or 2-8 for the layer inputs (one step per tensor)
    act_bits: int | None = None
    act_signed: bool = True  # signed activation grid (false: unsigned, for non-negative inputs)
    # fnmatch globs on module names left unquantized
    skip: list[str] = field(default_factory=lambda: ["lm_head"])


@dataclass(frozen=True)
class HASBSection:
    enabled: bool = False  # Hessian-aware stochastic bit switching (mixed precision per layer)
    sigma: float = 0.5  # final switch probability; it grows as sigma * (t + 1) / T
    warmup_steps: int = 0  # steps with switch probability 0 (no layer switches) before HASB
    hessian_iters: int = 7  # Hutchinson iterations for each layer's Hessian trace, at most
    hessian_tol: float = 1e-3  # stop once every trace moves by less than this, relatively
    hessian_batches: int = 1  # micro-batches (of all ranks) of the first training batch


@dataclass(frozen=True)
class BitSwitchSection:
    bits: list[int] | None = None  # null (off) or the candidate bit-widths, e.g. [8, 6, 4, 2] (2-8)
    # nearest (round half to even) | shift (right shift) from the 8-bit codes
    rounding: Literal["nearest", "shift"] = "nearest"
    # corrected (exact, per row) | faithful (the reference's)
    scale_grad: Literal["corrected", "faithful"] = "corrected"
    act_bits: bool = True  # quantize layer inputs, one LSQ step per bit-width
    act_signed: bool = True  # signed activation grid
    alrs_alpha: float = 0.1  # quantizer-group lr x alpha^k at the k-th bit-width (1: ALRS off)
    alrs_stop_bit: int = 0  # ALRS decays only bit-widths >= this
    distill: float = 0.0  # self-distillation weight, ramped over the run (0: off)
    eval_bits: int | None = None  # bit-width of evaluation and checkpoints (null: the highest)
    # fnmatch globs on module names left unquantized
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    hasb: HASBSection = field(default_factory=HASBSection)


@dataclass(frozen=True)
class AdaptersSection:
    type: Literal["lora", "l4q"] | None = None  # null (off) | lora | l4q (lptrain.lora)
    r: int = 8  # adapter rank, 1 .. min(in, out) of every target layer (B·A has no more)
    alpha: float = 16.0  # scaling alpha / r (peft's convention); > 0: 0 would train nothing
    dropout: float = 0.0  # on the adapter input (lora only)
    # module-name globs (full dotted name or its last part)
    targets: list[str] = field(default_factory=lambda: ["*"])
    # module-name globs left without adapters
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    # lora: the frozen base weight as is (none) or stored in bf16 / fp8 / int8 / int4 / nvfp4 / nf4
    base: Literal["none", "bf16", "fp8", "int8", "int4", "nvfp4", "nf4"] = "none"
    base_group_size: int = 64  # lora with base int4 or nf4: inputs per scale
    bits: int = 4  # l4q: weight bits, 2-8
    group_size: int = 128  # l4q: inputs per step/offset group


def library_config(cls: type, section, key: str, **given):
    """The library's config `cls` from the section's fields of the same names (a YAML key is
    the library's field name; a section adds only trainer options such as `skip`). A library
    ConfigError comes back re-rooted under the section: `qat.weight_bits: ...`."""
    kwargs = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)}
    try:
        return cls(**{**kwargs, **given})
    except ConfigError as exc:
        raise ConfigError(f"{key}.{exc.path}", exc.problem) from None


def qat_config(s: QATSection):
    """The lptrain.qat config, or a ConfigError naming `qat.<field>`."""
    return library_config(QATConfig, s, "qat")


def bitswitch_config(s: BitSwitchSection):
    """The lptrain.qat.bitswitch config, or a ConfigError naming `bitswitch.<field>`."""
    return library_config(BitSwitchConfig, s, "bitswitch", bits=tuple(s.bits or ()))


def _check_range(path: str, value, lo, hi, what: str) -> None:
    if not lo <= value <= hi:
        raise ConfigError(path, f"must be {what}, got {value}")


def check_bitswitch(cfg: "TrainConfig") -> None:
    s, h = cfg.bitswitch, cfg.bitswitch.hasb
    bits = bitswitch_config(s).bits
    for other, value in (("qat.method", cfg.qat.method), ("adapters.type", cfg.adapters.type)):
        if value is not None:
            raise ConfigError(
                "bitswitch.bits",
                f"bit switching with {other} {value} is not supported: bit switching trains "
                "every weight through its own quantizers",
            )
    if s.alrs_alpha <= 0 or s.alrs_alpha > 1:
        raise ConfigError("bitswitch.alrs_alpha", f"must be in (0, 1], got {s.alrs_alpha}")
    _check_range("bitswitch.alrs_stop_bit", s.alrs_stop_bit, 0, 8, "in 0..8")
    _check_range("bitswitch.distill", s.distill, 0.0, 1.0, "in [0, 1]")
    if s.eval_bits is not None and s.eval_bits not in bits:
        raise ConfigError("bitswitch.eval_bits", f"{s.eval_bits} is not one of bits {list(bits)}")
    if len(bits) < 2 and (h.enabled or s.distill > 0):
        key = "bitswitch.hasb.enabled" if h.enabled else "bitswitch.distill"
        raise ConfigError(key, f"needs at least two bit-widths, bits is {list(bits)}")
    _check_range("bitswitch.hasb.sigma", h.sigma, 0.0, 1.0, "in [0, 1]")
    for key in ("warmup_steps", "hessian_iters", "hessian_batches"):
        _check_range(f"bitswitch.hasb.{key}", getattr(h, key), int(key != "warmup_steps"),
                     float("inf"), f">= {int(key != 'warmup_steps')}")  # fmt: skip
    _check_range("bitswitch.hasb.hessian_tol", h.hessian_tol, 0.0, float("inf"), ">= 0")
    if h.enabled and not is_high_precision(cfg.precision):
        raise ConfigError(
            "bitswitch.hasb.enabled",
            f"needs precision.recipe fp32 or bf16, got {cfg.precision.recipe!r}: Hutchinson's "
            "double back-propagation does not run through quantized GEMMs",
        )


def adapter_config(s: AdaptersSection):
    return library_config(AdapterConfig, s, "adapters")


def check(cfg: "TrainConfig") -> None:
    """Section checks that need no model: values, combinations, that init.from exists."""
    if cfg.qat.method is not None:
        qat_config(cfg.qat)
    if cfg.bitswitch.bits is not None:
        check_bitswitch(cfg)
    if cfg.adapters.type is not None:
        adapter_config(cfg.adapters)
        if cfg.qat.method is not None:
            raise ConfigError(
                "adapters.type",
                f"{cfg.adapters.type} with qat.method {cfg.qat.method} is not supported: full "
                "QAT trains every weight, adapters freeze them (l4q is the QAT of adapters)",
            )
        if cfg.init.from_ is None:
            raise ConfigError(
                "init.from", "adapters fine-tune a pretrained model: give its run directory"
            )
