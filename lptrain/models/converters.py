"""Model converters: what `lptrain train` does to the model between building it and handing it
to DeepSpeed, in a fixed, documented order (torchtitan's pattern):

    init  ->  precision  ->  qat  ->  bitswitch  ->  adapters

`init` loads the weights fine-tuning starts from (`init.from`; a Hugging Face directory
replaces the model); `precision` swaps linear layers for lptrain's (recipe, skip globs,
backend); QAT (or bit switching, models/bitswitch.py: one or the other) then defines the
weights those GEMMs see; adapters go last because they wrap whatever layer is there. Each
converter has `convert(model, ctx)` and optionally `after_step(model, step)` (run by the loop
after every optimizer step). How a step runs (bit switching runs one batch at several
bit-widths) is the trainer's business (lptrain/trainer/). A new capability registers a
converter here instead of editing the loop. Converters run before `deepspeed.initialize`:
anything that edits parameters later is undone by the optimizer's fp32 master copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn

import lptrain.nn as lpnn
from lptrain import lora, qat
from lptrain.config import finetune
from lptrain.config.init_source import Source, locate
from lptrain.config.precision import (
    Override,
    is_high_precision,
    resolve_overrides,
    resolve_recipe,
)
from lptrain.config.schema import PrecisionConfig, TrainConfig
from lptrain.errors import ConfigError
from lptrain.lora import AdapterConfigError
from lptrain.models import decoder, hf, init_from
from lptrain.models.bitswitch import BitSwitchConverter
from lptrain.nn.backends import BackendError
from lptrain.nn.backends import resolve as resolve_backend
from lptrain.nn.select import require_match
from lptrain.qat import QATConfigError

ORDER = ("init", "precision", "qat", "bitswitch", "adapters")


@dataclass(frozen=True)
class ConvertContext:
    seed: int
    rank: int
    world: int
    say: Callable[[str], None]
    # A first training batch (tokens), for converters that calibrate on data before DeepSpeed
    # wraps the model (QAT input steps); None where no data is at hand (eval, export).
    # `sample(n)` gives n micro-batches' worth (bit switching's Hessian traces).
    sample: Callable[..., Any] | None = None
    vocab_size: int | None = None  # the tokenizer's, checked against a Hugging Face base


class Converter(Protocol):
    name: str

    def convert(self, model: nn.Module, ctx: ConvertContext) -> nn.Module: ...


class PrecisionConverter:
    """Swap eligible nn.Linear for lptrain.nn.Linear, apply `precision.overrides`, seed each
    rank's random streams, and MAX-reduce stateful amaxes over data-parallel ranks (equal
    scales on every rank)."""

    name = "precision"

    def __init__(self, cfg: PrecisionConfig):
        self.cfg = cfg
        self.recipe = resolve_recipe(cfg)
        self.overrides = resolve_overrides(cfg)
        if self.overrides and cfg.backend == "te":
            raise ConfigError(
                "precision.overrides",
                "backend 'te' runs TransformerEngine's Linear, one recipe for its three GEMMs: "
                "per-GEMM overrides need backend auto, emulated or triton",
            )

    def convert(self, model: nn.Module, ctx: ConvertContext) -> nn.Module:
        c = self.cfg
        try:
            model = lpnn.convert(
                model,
                self.recipe,
                skip=tuple(c.skip),
                min_features=c.min_features,
                backend=c.backend,
                log_fn=ctx.say,
            )
            if self.overrides:
                override(model, self.overrides, c.backend, ctx.say)
        except BackendError as exc:  # no GPU, no TE, a refused recipe: one line, exit 2
            raise ConfigError("precision.backend", exc.problem) from None
        if c.saved_activations != "none":
            SavedActivationsConverter(c.saved_activations).convert(model, ctx)
        lpnn.seed_quantizers(model, ctx.seed, ctx.rank)
        if ctx.world > 1:
            lpnn.set_amax_reduce(model, _reduce_max)
        # Quantized weights may be kept across gradient-accumulation micro-batches: the loop
        # calls after_step after every optimizer step, which drops them.
        for backend in _backends(model):
            if hasattr(backend, "cache_weights"):
                backend.cache_weights = True
        return model

    def after_step(self, model: nn.Module, step: int) -> None:
        for backend in _backends(model):
            backend.after_step()


class SavedActivationsConverter:
    """`precision.saved_activations` alone, for a high-precision recipe (PrecisionConverter
    applies it after swapping the Linears otherwise): the decoder's RMSNorm, SwiGLU and
    attention keep FP8 copies of their inputs for backward (models/saved.py)."""

    name = "precision"

    def __init__(self, mode: str):
        self.mode = mode

    def convert(self, model: nn.Module, ctx: ConvertContext) -> nn.Module:
        n = decoder.set_saved_activations(model, self.mode)
        ctx.say(f"precision.saved_activations: {n} RMSNorm/SwiGLU/attention ops keep {self.mode}")
        return model


def override(model: nn.Module, overrides: list[Override], backend: str, say) -> None:
    """Put each converted layer on its recipe with the overrides that match it applied
    (`Linear.set_recipe`: same seed, fresh quantizer state, the backend resolved for the new
    recipe). An entry whose globs match no converted layer, or that changes no layer's
    recipe, is a ConfigError naming it: it would do nothing, silently."""
    layers = dict(lpnn.quantized_layers(model))
    for o in overrides:
        require_match(f"{o.key}.layers", list(o.layers), list(layers), "lptrain layer")
    changed = {o.key: 0 for o in overrides}
    resolved: dict = {}  # recipe -> its backend, resolved once (as convert does per model)
    counts: dict[str, int] = {}  # recipe name -> layers now on it
    for name, layer in layers.items():
        recipe = layer.recipe
        for o in (o for o in overrides if o.applies_to(name)):
            new = o.apply(recipe)
            changed[o.key] += not new.runs_like(recipe)
            recipe = new
        if recipe != layer.recipe:
            if recipe not in resolved:
                resolved[recipe] = _backend(backend, recipe, layer)
            layer.set_recipe(recipe, resolved[recipe])
            counts[recipe.name] = counts.get(recipe.name, 0) + 1
    idle = [key for key, n in changed.items() if n == 0]
    if idle:
        o = next(o for o in overrides if o.key == idle[0])
        what = ", ".join(o.gemms) + (f" {o.operand}" if o.operand else "")
        raise ConfigError(
            f"{o.key}.recipe",
            f"changes nothing: every layer it matches already runs {what} as {o.source.name} does",
        )
    say("precision.overrides: " + ", ".join(f"{n} layer(s) on {r}" for r, n in counts.items()))


def _backend(name: str, recipe, layer: nn.Module):
    """The `precision.backend` setting resolved for an overridden layer's recipe."""
    try:
        return resolve_backend(name, recipe, layer.weight.device)
    except BackendError as exc:
        raise ConfigError("precision.backend", exc.problem) from None


def _backends(model: nn.Module) -> list:
    """The distinct backends of the model's lptrain layers (one per conversion)."""
    out = {}
    for _, layer in lpnn.quantized_layers(model):
        out.setdefault(id(layer.backend), layer.backend)
    return list(out.values())


def _reduce_max(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _precision(cfg: TrainConfig) -> Converter | None:
    if not is_high_precision(cfg.precision):
        return PrecisionConverter(cfg.precision)
    if cfg.precision.overrides:  # they change converted layers, and this recipe converts none
        raise ConfigError(
            "precision.overrides",
            f"precision.recipe {cfg.precision.recipe} converts no layer: overrides change the "
            "GEMMs of converted layers (set a low-precision recipe and override the rest)",
        )
    if cfg.precision.saved_activations != "none":  # fp8 saved inputs around fp32/bf16 GEMMs
        return SavedActivationsConverter(cfg.precision.saved_activations)
    return None


class InitConverter:
    """Load `init.from`: an lptrain checkpoint into the built model (same architecture: shapes
    are checked), or a Hugging Face model directory, which replaces the model. A run's copy of
    its base (`source.config_only`, checkpoint/base.py) gives the architecture only: the
    checkpoint about to be loaded holds the weights."""

    name = "init"

    def __init__(self, source: Source):
        self.source = source

    def convert(self, model: nn.Module, ctx: ConvertContext) -> nn.Module:
        src = self.source
        if src.kind == "hf":
            model = hf.from_config(src.path) if src.config_only else hf.load(src.path)
            vocab = hf.vocab_size(model)
            if ctx.vocab_size is not None and ctx.vocab_size > vocab:
                raise ConfigError(
                    "data.tokenizer",
                    f"{ctx.vocab_size} token ids but the model at {src.path} embeds {vocab}",
                )
            ctx.say(f"init: Hugging Face model {src.path} ({type(model.model).__name__})")
            return model
        if src.config_only:
            return model  # an lptrain base has this architecture; the checkpoint its weights
        state = init_from.load_state(src.ckpt_dir, src.tag)
        n = init_from.load_into(model, state, str(src.ckpt_dir / src.tag))
        ctx.say(f"init: {n} tensors from {src.ckpt_dir / src.tag}")
        return model


class QATConverter:
    """LSQ / LSQ+ on every eligible linear (lptrain.qat.prepare); input steps are calibrated
    on the first batch here, before DeepSpeed's master copy exists."""

    name = "qat"

    def __init__(self, cfg: TrainConfig):
        self.qat_cfg = finetune.qat_config(cfg.qat)
        self.skip = tuple(cfg.qat.skip)

    def convert(self, model: nn.Module, ctx: ConvertContext) -> nn.Module:
        model = qat.prepare(model, self.qat_cfg, skip=self.skip, log_fn=ctx.say)
        if self.qat_cfg.act_bits is not None and ctx.sample is not None:
            qat.calibrate(model, ctx.sample())
        return model


class AdapterConverter:
    """LoRA (on a base stored as configured) or L4Q on the target layers; all else frozen."""

    name = "adapters"

    def __init__(self, cfg: TrainConfig):
        self.adapter_cfg = finetune.adapter_config(cfg.adapters)

    def convert(self, model: nn.Module, ctx: ConvertContext) -> nn.Module:
        try:
            return lora.apply(model, self.adapter_cfg, log_fn=ctx.say)
        except AdapterConfigError as exc:
            raise ConfigError(f"adapters.{exc.field}", exc.problem) from None


def _init(cfg: TrainConfig) -> Converter | None:
    return InitConverter(locate(cfg.init.from_)) if cfg.init.from_ is not None else None


def _qat(cfg: TrainConfig) -> Converter | None:
    return QATConverter(cfg) if cfg.qat.method is not None else None


def _bitswitch(cfg: TrainConfig) -> Converter | None:
    if cfg.bitswitch.bits is None:
        return None
    return BitSwitchConverter(cfg)


def _adapters(cfg: TrainConfig) -> Converter | None:
    return AdapterConverter(cfg) if cfg.adapters.type is not None else None


def _qat_error(exc: Exception) -> ConfigError:
    return ConfigError(f"qat.{exc.field}", exc.problem)


# name -> factory(cfg) returning the converter, or None when the config does not ask for it.
REGISTRY: dict[str, Callable[[TrainConfig], Converter | None]] = {
    "init": _init,
    "precision": _precision,
    "qat": _qat,
    "bitswitch": _bitswitch,
    "adapters": _adapters,
}


def build(
    cfg: TrainConfig, names: tuple[str, ...] = ORDER, base: Source | None = None
) -> list[Converter]:
    """The converters this config asks for, in ORDER, among `names`; raises ConfigError on bad
    sections. Only the named ones are built: an export's skeleton (precision only) must not
    look for an `init.from` base that may be gone. `base`: `init.from` as resolved already
    (checkpoint/base.py), instead of locating it here."""
    out = []
    for name in (n for n in ORDER if n in names):
        factory = REGISTRY.get(name)
        if name == "init" and base is not None:
            factory = lambda _cfg: InitConverter(base)  # noqa: E731
        conv = factory(cfg) if factory else None
        if conv is not None:
            out.append(conv)
    return out


def apply(model: nn.Module, converters: list[Converter], ctx: ConvertContext) -> nn.Module:
    for conv in converters:
        try:
            model = conv.convert(model, ctx)
        except QATConfigError as exc:  # a layer-dependent problem (a group size): name the key
            raise _qat_error(exc) from None
    return model


def after_step(model: nn.Module, converters: list[Converter], step: int) -> None:
    for conv in converters:
        hook = getattr(conv, "after_step", None)
        if hook is not None:
            hook(model, step)
