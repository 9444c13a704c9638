"""Typed recipe files: YAML is parsed once, here, into frozen dataclasses.

Every problem is raised as `ConfigError(key_path, problem)`; the CLI prints it as one line
`error: <key.path>: <problem>` and exits 2. Nothing past this module reads raw YAML.

Longer than our usual file on purpose: every section of a recipe file and its checks read in one
place, next to the one generic parser that turns YAML into these dataclasses.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lptrain.config import finetune
from lptrain.config.finetune import (
    AdaptersSection,
    BitSwitchSection,
    InitConfig,
    QATSection,
)
from lptrain.errors import ConfigError, first_line  # noqa: F401  (re-exported)
from lptrain.nn.recipe import GEMMS
from lptrain.nn.select import matches


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"  # a key of model.PRESETS; the fields below override it
    dim: int | None = None  # model width; null: the preset's
    n_layers: int | None = None  # decoder blocks; null: the preset's
    n_heads: int | None = None  # attention heads; null: the preset's
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); null: the preset's
    ffn_dim: int | None = None  # SwiGLU hidden width; null: the preset's
    # share the embedding and lm_head weights; null: the preset's
    tie_embeddings: bool | None = None
    dropout: float = 0.0  # dropout after attention and the MLP (random, so resume replays the RNG)
    rope_theta: float = 10000.0  # rotary position embedding base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # normal init of the weights (residual projections scaled by depth)
    # Activation checkpointing of every decoder block (torch.utils.checkpoint, non-reentrant):
    # the forward is recomputed in backward, bit for bit, quantizer state updated once.
    checkpointing: bool = False


@dataclass(frozen=True)
class GuardConfig:
    """The precision guard (observe/guard.py): a layer whose statistics stay bad for
    `patience` consecutive checks falls back to the next recipe of `fallback` from the next
    step on. A threshold left null is not checked."""

    enabled: bool = False  # turn the guard on
    # recipes a failing layer falls back through, in order
    fallback: list[Union[str, dict]] = field(default_factory=lambda: ["fp8-current", "bf16"])
    # Healthy runs of every recipe on the tiny model stay above 9 dB and below 19% saturated
    # (MXFP4's floor rule and Quartet's clipping saturate by design): the defaults sit outside.
    min_sqnr_db: float | None = 3.0  # an operand's SQNR below this is bad
    max_saturated: float | None = 0.3  # an operand's saturated fraction above this is bad
    patience: int = 3  # consecutive bad checks before a fallback
    interval: int = 10  # steps between checks
    layers: list[str] = field(default_factory=lambda: ["*"])  # fnmatch globs on layer names
    operands: list[str] = field(default_factory=lambda: ["*"])  # globs on '<gemm>.<operand>'
    # on resume, drop the checkpoint's fallbacks: every layer back on precision.recipe (kept
    # otherwise, whatever `enabled` says)
    reset: bool = False
    # what falls back: `layer` (the whole layer takes the next recipe) or `gemm` (only the GEMM
    # whose operand failed takes that GEMM from the next recipe)
    granularity: Literal["layer", "gemm"] = "layer"


@dataclass(frozen=True)
class OverrideConfig:
    """One entry of `precision.overrides` (docs/layers.md): in the layers matching `layers`,
    the GEMMs named by `gemm` (or only their `operand`) run as `recipe` runs them. Entries
    apply in order, after `precision.recipe`; the guard never changes what they set."""

    layers: list[str] = field(default_factory=lambda: ["*"])  # fnmatch globs on layer names
    # output | grad_input | grad_weight, a list of them, or "*" (every GEMM, or with `operand`
    # every GEMM that has it)
    gemm: Union[str, list[str]] = "*"
    operand: str | None = None  # input | weight | grad_output; null: the whole GEMM
    # a named recipe or an inline mapping (required): its spec of that GEMM / operand is taken
    recipe: Union[str, dict, None] = None


@dataclass(frozen=True)
class PrecisionConfig:
    # A named recipe (see `lptrain recipes`) or an inline recipe dict for lptrain.recipes.from_dict.
    recipe: Union[str, dict] = "fp32"
    skip: list[str] = field(default_factory=lambda: ["lm_head"])  # fnmatch globs on module names
    # auto | emulated | triton | te (chosen once per model, reason logged)
    backend: Literal["auto", "emulated", "triton", "te"] = "auto"
    min_features: int = 0  # leave Linears whose smaller dimension is below this unconverted
    # per-layer, per-GEMM or per-operand exceptions to `recipe`, applied in order at conversion
    overrides: list[OverrideConfig] = field(default_factory=list)
    guard: GuardConfig = field(default_factory=GuardConfig)
    # What RMSNorm, SwiGLU and attention keep for backward: none (their inputs as they are) |
    # fp8 (E4M3 codes, one fp32 scale per 1x128 group; backward recomputes the op from them;
    # the forward is unchanged bit for bit). Any recipe, fp32 and bf16 included (models/saved.py).
    saved_activations: Literal["none", "fp8"] = "none"


@dataclass(frozen=True)
class DataConfig:
    # null: the embedded corpus embedded:stdlib (embedded:pydoc-topics is the fine-tuning one;
    # both are snapshots shipped with lptrain). Otherwise a local file, directory or glob of
    # .txt/.md/.py/.jsonl/.json/.parquet files, or a hub dataset name already in cache_dir/hf.
    path: str | None = None
    text_key: str = "text"  # the text column of .jsonl/.parquet files
    # byte (lptrain's 257 ids), a local tokenizer.json or transformers directory. null: the
    # base's (`init.from`: an lptrain run's tokenizer, a Hugging Face directory's own; one that
    # ships none is refused, set byte to mean it); byte without a base.
    tokenizer: str | None = None
    block_size: int = 128  # tokens per training sequence
    val_fraction: float = 0.02  # held-out blocks (a fixed split, independent of run.seed)
    cache_dir: str | None = None  # tokenized blocks cache; null: ~/.cache/lptrain


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # AdamW peak learning rate (torch's implementation: deterministic)
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    warmup_steps: int = 0  # linear warmup, then `decay` to lr * min_lr_ratio at the last step
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # the schedule after warmup
    weight_decay: float = 0.1  # on matrices only, not on norms or quantizer steps
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # written explicitly: DeepSpeed's default changed to 1.0 (PR #8068)
    # How Adam's moments are kept between steps: fp32 | bf16 | fp8 | int8-block (block-scaled
    # codes; the second moment as sqrt(v)). Not fp32: lptrain's CompactAdamW (optim/).
    states: Literal["fp32", "bf16", "fp8", "int8-block"] = "fp32"
    # fp32: an fp32 copy of the weights (DeepSpeed's); bf16-sr: bf16 weights and no copy, each
    # update rounded stochastically (needs deepspeed.dtype bf16 and zero_stage 0)
    master: Literal["fp32", "bf16-sr"] = "fp32"


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 0  # ZeRO stage 0-3
    micro_batch: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    train_batch_size: int | None = None  # optional; checked against micro x accum x world
    # fp32 | bf16 | fp16 (GPU only) engine precision
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    extra: dict = field(default_factory=dict)  # merged into deepspeed.json as is
    # ZeRO-3: build the model inside deepspeed.zero.Init (parameters created partitioned).
    zero_init: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 0  # steps between saves; 0 saves only at the end and on SIGTERM/SIGINT
    keep_last: int = 2  # keep the newest N checkpoints up to the current step (2 leaves a fallback)
    resume: str = "auto"  # auto | none | a checkpoints directory or one tag directory
    save_final: bool = True  # save at the last step whatever `interval` says


@dataclass(frozen=True)
class WandbConfig:
    # auto: online with credentials, else offline
    mode: Literal["auto", "online", "offline", "disabled"] = "disabled"
    project: str = "lptrain"  # W&B project
    entity: str | None = None  # W&B entity (team or user)
    name: str | None = None  # W&B run name; null: run.name
    group: str | None = None  # W&B group (e.g. one sweep or one comparison)
    job_type: str | None = None  # W&B job type (e.g. pretrain, finetune, eval)
    tags: list[str] = field(default_factory=list)  # W&B tags


@dataclass(frozen=True)
class LoggingConfig:
    interval: int = 10  # steps between metrics.jsonl rows and log lines
    progress: Literal["auto", "bar", "lines"] = "auto"  # auto: a bar on a TTY
    wandb: WandbConfig = field(default_factory=WandbConfig)


STATS = ("amax", "scale", "saturated", "underflow", "clamped", "sqnr_db", "dynamic_range")
# Opt-in (monitor.stats): signed min / max / mean / std, and the blockwise dynamic range
# (numerics/stats.py: the largest over 32-element blocks, the share of blocks beyond the format's).
STATS_EXTRA = ("nonfinite", "rms", "min", "max", "mean", "std")
STATS_EXTRA += ("block_dynamic_range", "block_range_exceeded")
STATS_ALL = (*STATS, *STATS_EXTRA)


@dataclass(frozen=True)
class SpikeConfig:
    """Loss-spike detection (observe/spikes.py), on every step's loss."""

    ema: float = 0.02  # weight of the newest loss in the running mean and variance
    threshold: float = 5.0  # spike: (loss - running mean) / running std above this
    warmup: int = 50  # first losses left out (the initial drop is not the run's noise)
    divergence: int = 100  # a spike not recovered within this many steps: diverged


# What `monitor.schedule` can time: a statistic of `monitor.stats` or a per-layer weight metric.
SCHEDULABLE = (*STATS_ALL, "grad_norm", "update_ratio", "fidelity")


@dataclass(frozen=True)
class StatSchedule:
    """When one statistic is logged (`monitor.schedule.<name>`); a null field takes the
    `monitor.` field of the same name."""

    interval: int | None = None  # every `interval` steps
    start_step: int | None = None  # first step
    end_step: int | None = None  # last step, inclusive


@dataclass(frozen=True)
class MonitorConfig:
    """Per-layer numerics (observe/): every `interval` steps from `start_step` to
    `end_step`, one row per step in layers.jsonl (and W&B). The default set costs < 3%."""

    interval: int = 100  # 0 turns the per-layer rows off
    start_step: int = 0  # first step with per-layer rows
    end_step: int | None = None  # inclusive; null: to the end of the run
    layers: list[str] = field(default_factory=lambda: ["*"])  # fnmatch globs on linear layers
    # per-operand statistics; also nonfinite, rms, min, max, mean, std, block_dynamic_range,
    # block_range_exceeded (STATS_EXTRA)
    stats: list[Literal[STATS_ALL]] = field(default_factory=lambda: list(STATS))
    grad_norm: bool = True  # per-layer gradient norms
    update_ratio: bool = True  # per-layer |dW| / |W| of the optimizer step
    fidelity: bool = False  # gradient cosine vs high precision on a fixed probe batch
    # Recipes whose statistics are logged on the same operands without changing training
    # (shadow/<recipe>/... keys; nn/shadow.py)
    shadow: list[str] = field(default_factory=list)
    # Per-statistic timing overriding interval / start_step / end_step, e.g.
    # {sqnr_db: {interval: 10}, grad_norm: {end_step: 1000}} (names: SCHEDULABLE)
    schedule: dict[str, StatSchedule] = field(default_factory=dict)
    # block: per-layer keys reduced per decoder block (observe/layers.py BLOCK_REDUCE: the
    # worst layer's SQNR, saturation, underflow, ...), for models with many layers
    aggregate: Literal["layer", "block"] = "layer"
    # Adam moments' quantization SQNR and underflow per parameter (`optim/` keys); null: on
    # whenever optim.states quantizes them and the optimizer holds the layers' own tensors
    optim_states: bool | None = None
    peak_flops: float | None = None  # per rank, for MFU (e.g. 989e12: H100 dense BF16)
    spike: SpikeConfig = field(default_factory=SpikeConfig)


@dataclass(frozen=True)
class RunConfig:
    max_steps: int | None = None  # max_steps or max_tokens is required
    max_tokens: int | None = None  # alternative to max_steps; the smaller limit wins
    # Save and exit at this step; the schedule still spans max_steps (job time slices).
    stop_at_step: int | None = None
    seed: int = 0  # model init, data order and stochastic rounding
    eval_interval: int = 0  # 0 disables evaluation during training
    # Validation micro-batches per rank per evaluation: the split's first eval_batches x
    # micro_batch x ranks blocks, each once (a smaller split is read whole, with a warning).
    eval_batches: int = 4
    name: str | None = None  # default: the recipe file's stem
    nonfinite_limit: int = 3  # consecutive skipped steps before reloading the last checkpoint
    max_reloads: int = 2  # reloads before giving up with an error


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Fine-tuning (config/finetune.py): weights to start from, QAT, bit switching,
    # adapters.
    init: InitConfig = field(default_factory=InitConfig)
    qat: QATSection = field(default_factory=QATSection)
    bitswitch: BitSwitchSection = field(default_factory=BitSwitchSection)
    adapters: AdaptersSection = field(default_factory=AdaptersSection)

    def to_dict(self) -> dict:
        return _as_dict(self)


def _key(f: dataclasses.Field) -> str:
    """The YAML key of a field (`metadata={"key": ...}` when the name is a Python keyword)."""
    return f.metadata.get("key", f.name)


def _as_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_key(f): _as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _as_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- generic typed parsing


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                continue
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(path, f"expected {names}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(path, f"expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is dict:  # dict[str, X]: a mapping whose values are X, each under its key
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        item = typing.get_args(tp)[1]
        return {k: _coerce(item, v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    return _scalar(tp, value, path)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is type(None) and value is None:
        return None
    # bool is an int subclass in Python; a YAML `true` is never a valid step count.
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads `1e-3` without a dot as a string
    if tp in (bool, str, dict) and isinstance(value, tp):
        return value
    raise ConfigError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(path or "<recipe>", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    keys = {_key(f): f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in keys:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(where, f"unknown key (known: {', '.join(keys)})")
    kwargs = {}
    for key, name in keys.items():
        if key in data:
            kwargs[name] = _coerce(hints[name], data[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


# ---------------------------------------------------------------- overrides and checks


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `--set a.b=value`; the value is YAML, so `3`, `1e-3`, `[a, b]` keep types."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError("--set", f"expected KEY=VALUE, got {assignment!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a section; cannot set a key in it")
        node = child
    node[parts[-1]] = value


def _check_positive(cfg: TrainConfig) -> None:
    for path, value in [
        ("deepspeed.micro_batch", cfg.deepspeed.micro_batch),
        ("deepspeed.grad_accum", cfg.deepspeed.grad_accum),
        ("data.block_size", cfg.data.block_size),
        ("logging.interval", cfg.logging.interval),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last),
    ]:
        if value < 1:
            raise ConfigError(path, f"must be >= 1, got {value}")
    for path, value in [
        ("run.eval_interval", cfg.run.eval_interval),
        ("checkpoint.interval", cfg.checkpoint.interval),
        ("optim.warmup_steps", cfg.optim.warmup_steps),
    ]:
        if value < 0:
            raise ConfigError(path, f"must be >= 0, got {value}")


def _check(cfg: TrainConfig) -> None:
    _check_positive(cfg)
    if cfg.run.max_steps is None and cfg.run.max_tokens is None:
        raise ConfigError("run.max_steps", "required (or give run.max_tokens)")
    if cfg.run.max_steps is not None and cfg.run.max_steps < 1:
        raise ConfigError("run.max_steps", f"must be >= 1, got {cfg.run.max_steps}")
    if cfg.deepspeed.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(
            "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.deepspeed.zero_stage}"
        )
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {cfg.data.val_fraction}")
    if cfg.optim.lr <= 0:
        raise ConfigError("optim.lr", f"must be > 0, got {cfg.optim.lr}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas", f"expected two numbers, got {cfg.optim.betas}")
    _check_optim_storage(cfg)
    _check_run_name(cfg.run.name)
    _check_monitor(cfg.monitor)
    _check_guard(cfg.precision.guard)
    # The bf16 recipe converts nothing: bf16 comes from DeepSpeed's dtype alone. Without it the
    # run is fp32 under a bf16 name (a loss comparison "changing only precision.recipe" then
    # compares fp32 with itself), so refuse it.
    if cfg.precision.recipe == "bf16" and cfg.deepspeed.dtype != "bf16":
        raise ConfigError(
            "precision.recipe",
            f"'bf16' runs in bf16 only with deepspeed.dtype: bf16 (got {cfg.deepspeed.dtype!r})",
        )
    _check_files(cfg)
    finetune.check(cfg)


def _check_optim_storage(cfg: TrainConfig) -> None:
    o, d = cfg.optim, cfg.deepspeed
    if cfg.monitor.optim_states and o.states == "fp32":
        raise ConfigError(
            "monitor.optim_states",
            "optim.states fp32 keeps the moments unquantized: there is no quantization error to "
            "log (set optim.states bf16, fp8 or int8-block)",
        )
    if o.master == "bf16-sr" and d.dtype != "bf16":
        raise ConfigError(
            "optim.master", f"bf16-sr keeps bf16 weights: needs deepspeed.dtype bf16, got {d.dtype}"
        )
    if o.master == "bf16-sr" and d.zero_stage != 0:
        raise ConfigError(
            "optim.master",
            "bf16-sr needs deepspeed.zero_stage 0: ZeRO 1-3 keep their own fp32 partition of "
            "the weights, the copy this setting removes",
        )


def _check_run_name(name: str | None) -> None:
    # The default run directory is runs/<name>-<time>: a separator or a leading dot (`..`)
    # would put it outside runs/ or hide it.
    if name is not None and (name == "" or name.startswith(".") or any(c in name for c in "/\\")):
        raise ConfigError(
            "run.name", f"{name!r} must be one folder name: no '/' or '\\', no leading '.'"
        )


def _check_monitor(m: MonitorConfig) -> None:
    for path, value in [
        ("monitor.interval", m.interval),
        ("monitor.start_step", m.start_step),
        ("monitor.spike.warmup", m.spike.warmup),
    ]:
        if value < 0:
            raise ConfigError(path, f"must be >= 0, got {value}")
    if m.end_step is not None and m.end_step < m.start_step:
        raise ConfigError("monitor.end_step", f"{m.end_step} < start_step {m.start_step}")
    if m.peak_flops is not None and m.peak_flops <= 0:
        raise ConfigError("monitor.peak_flops", f"must be > 0, got {m.peak_flops}")
    if not 0.0 < m.spike.ema < 1.0:
        raise ConfigError("monitor.spike.ema", f"must be in (0, 1), got {m.spike.ema}")
    if m.spike.threshold <= 0:
        raise ConfigError("monitor.spike.threshold", f"must be > 0, got {m.spike.threshold}")
    if m.spike.divergence < 1:
        raise ConfigError("monitor.spike.divergence", f"must be >= 1, got {m.spike.divergence}")
    for name, sched in m.schedule.items():
        _check_schedule(m, name, sched)


def _check_schedule(m: MonitorConfig, name: str, s: StatSchedule) -> None:
    """One `monitor.schedule` entry times something that is logged, and changes its timing."""
    path = f"monitor.schedule.{name}"
    if name not in SCHEDULABLE:
        raise ConfigError(path, f"unknown statistic (known: {', '.join(SCHEDULABLE)})")
    if name in STATS_ALL and name not in m.stats:
        raise ConfigError(path, "not in monitor.stats (the schedule says when, stats what)")
    if name not in STATS_ALL and not getattr(m, name):
        raise ConfigError(path, f"monitor.{name} is false: there is nothing to time")
    if not m.interval:
        raise ConfigError(path, "per-layer rows are off (monitor.interval: 0)")
    if s == StatSchedule():
        raise ConfigError(path, "sets none of interval, start_step, end_step")
    if s.interval is not None and s.interval < 1:
        raise ConfigError(f"{path}.interval", f"must be >= 1, got {s.interval}")
    start = m.start_step if s.start_step is None else s.start_step
    end = m.end_step if s.end_step is None else s.end_step
    if start < 0:
        raise ConfigError(f"{path}.start_step", f"must be >= 0, got {start}")
    if end is not None and end < start:
        raise ConfigError(path, f"end_step {end} < start_step {start}")


def _check_guard(g: GuardConfig) -> None:
    for path, value in [("patience", g.patience), ("interval", g.interval)]:
        if value < 1:
            raise ConfigError(f"precision.guard.{path}", f"must be >= 1, got {value}")
    if g.max_saturated is not None and not 0.0 <= g.max_saturated <= 1.0:
        raise ConfigError(
            "precision.guard.max_saturated", f"must be in [0, 1], got {g.max_saturated}"
        )
    if g.enabled and not g.fallback:
        raise ConfigError("precision.guard.fallback", "empty: name at least one recipe")
    if g.enabled and g.min_sqnr_db is None and g.max_saturated is None:
        raise ConfigError("precision.guard", "enabled without min_sqnr_db or max_saturated")
    operands = [f"{gemm}.{op}" for gemm, pair in GEMMS.items() for op in pair]
    for i, pattern in enumerate(g.operands if g.enabled else ()):
        if not any(matches(o, [pattern]) for o in operands):  # a typo: that glob watches nothing
            raise ConfigError(
                f"precision.guard.operands[{i}]",
                f"{pattern!r} matches no operand; they are {', '.join(operands)}",
            )


def _check_files(cfg: TrainConfig) -> None:
    tok = cfg.data.tokenizer
    if tok not in (None, "byte") and not Path(tok).exists():
        hint = " (lptrain's byte tokenizer is spelled `byte`)" if tok == "bytes" else ""
        raise ConfigError("data.tokenizer", f"no such file or directory: {tok}{hint}")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "none") and not Path(resume).exists():
        raise ConfigError("checkpoint.resume", f"no such checkpoint: {resume}")
    check_data_path(cfg.data.path)


def check_data_path(path: str | None, key: str = "data.path") -> None:
    """A local corpus path that matches nothing is one line naming `key` (a hub name is
    looked up in the cache later)."""
    if path is not None and _looks_local(path) and not _local_matches(path):
        raise ConfigError(key, f"no such file or directory: {path}")


def _looks_local(path: str) -> bool:
    # Hub names are `name` or `owner/name`; anything with a suffix, a glob, or a leading
    # ./ ~ / is a local path.
    return (
        path.startswith((".", "/", "~"))
        or any(c in path for c in "*?[")
        or Path(path).suffix != ""
        or Path(path).exists()
    )


def _local_matches(path: str) -> bool:

    return bool(glob.glob(os.path.expanduser(path)))


def parse(raw: dict) -> TrainConfig:
    cfg = _build(TrainConfig, raw, "")
    if cfg.data.tokenizer is None and cfg.init.from_ is None:  # no base to take one from
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="byte"))
    _check(cfg)
    return cfg


def load(recipe_path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
    """Read a recipe file, apply `--set` overrides, validate, and return the typed config."""
    path = Path(recipe_path)
    if not path.is_file():
        raise ConfigError(str(path), "no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(str(path), f"invalid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "the recipe must be a mapping of sections")
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = parse(raw)
    if cfg.run.name is None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=path.stem))
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
