"""Recipe sections for fine-tuning: `init`, `qat`, `adapters` (typed, parsed by config.py).

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
    adapters:
      type: null          # null (off) | lora | l4q
      r: 8
      alpha: 16.0         # scaling alpha / r
      dropout: 0.0        # lora only
      targets: ['*']      # module-name globs (full name or last part)
      skip: [lm_head]
      base: none          # lora: frozen base storage none | bf16 | fp8 | int8 | int4 | nvfp4
      base_group_size: 64 # lora with base int4: inputs per scale
      bits: 4             # l4q: 2-8
      group_size: 128     # l4q: inputs per step/offset group

The checks here run when the recipe is parsed (exit 2 with the key path before anything is
written); the layer-dependent ones (a group size that does not divide a layer) when the
converters run, also before the run directory is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lptrain.train.config import TrainConfig


@dataclass(frozen=True)
class InitConfig:
    # `from` is a Python keyword: the field is `from_`, its YAML key `from` (config.py aliases).
    from_: str | None = field(default=None, metadata={"key": "from"})


@dataclass(frozen=True)
class QATSection:
    method: Literal["lsq", "lsq+"] | None = None
    weight_bits: int = 4
    weight_granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = 128
    act_bits: int | None = None
    act_signed: bool = True
    skip: list[str] = field(default_factory=lambda: ["lm_head"])


@dataclass(frozen=True)
class AdaptersSection:
    type: Literal["lora", "l4q"] | None = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["*"])
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    base: Literal["none", "bf16", "fp8", "int8", "int4", "nvfp4"] = "none"
    base_group_size: int = 64
    bits: int = 4
    group_size: int = 128


def qat_config(s: QATSection):
    """The lptrain.qat config, or a ConfigError naming `qat.<field>`."""
    from lptrain.qat import QATConfig, QATConfigError
    from lptrain.train.config import ConfigError

    try:
        return QATConfig(s.method, s.weight_bits, s.weight_granularity, s.group_size,
                         s.act_bits, s.act_signed)  # fmt: skip
    except QATConfigError as exc:
        raise ConfigError(f"qat.{exc.field}", exc.problem) from None


def adapter_config(s: AdaptersSection):
    from lptrain.lora import AdapterConfig, AdapterConfigError
    from lptrain.train.config import ConfigError

    try:
        return AdapterConfig(s.type, s.r, s.alpha, s.dropout, list(s.targets), list(s.skip),
                             s.base, s.base_group_size, s.bits, s.group_size)  # fmt: skip
    except AdapterConfigError as exc:
        raise ConfigError(f"adapters.{exc.field}", exc.problem) from None


def check(cfg: "TrainConfig") -> None:
    """Section checks that need no model: values, combinations, that init.from exists."""
    from lptrain.train import init_from
    from lptrain.train.config import ConfigError

    if cfg.qat.method is not None:
        qat_config(cfg.qat)
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
    if cfg.init.from_ is not None:
        init_from.locate(cfg.init.from_)  # raises ConfigError('init.from', ...) if unusable
