"""Model converters: what `lptrain train` does to the model between building it and handing it
to DeepSpeed, in a fixed, documented order (torchtitan's pattern):

    precision  ->  qat  ->  adapters

`precision` swaps linear layers for lptrain's (recipe, skip globs, backend); QAT then defines
the weights those GEMMs see; adapters go last because they wrap whatever layer is there. Each
converter has `convert(model, ctx)`; optionally `after_step(model, step)` (run by the loop
after every optimizer step) and `wrap_step(step_fn)` (e.g. a multi-precision step that runs
one batch at several bit-widths). A new capability registers a converter here instead of
editing the loop. Converters run before `deepspeed.initialize`: anything that edits parameters
later is undone by the optimizer's fp32 master copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain import recipes
from lptrain.train.config import ConfigError, PrecisionConfig, TrainConfig

ORDER = ("precision", "qat", "adapters")
HIGH_PRECISION = ("fp32", "bf16")  # named recipes that convert nothing


@dataclass(frozen=True)
class ConvertContext:
    seed: int
    rank: int
    world: int
    say: Callable[[str], None]


class Converter(Protocol):
    name: str

    def convert(self, model: nn.Module, ctx: ConvertContext) -> nn.Module: ...


def resolve_recipe(p: PrecisionConfig) -> recipes.Recipe:
    """The validated precision recipe (a name or an inline mapping), or a ConfigError."""
    if isinstance(p.recipe, str):
        if p.recipe not in recipes.names():
            raise ConfigError(
                "precision.recipe",
                f"unknown recipe {p.recipe!r} (known: {', '.join(recipes.names())})",
            )
        return recipes.get(p.recipe)
    try:
        return recipes.from_dict(p.recipe)
    except ValueError as exc:
        # from_dict names the bad field inside the recipe; prefix our own path.
        raise ConfigError("precision.recipe", str(exc)) from None


def is_high_precision(p: PrecisionConfig) -> bool:
    return isinstance(p.recipe, str) and p.recipe in HIGH_PRECISION


class PrecisionConverter:
    """Swap eligible nn.Linear for lptrain.nn.Linear, seed each rank's random streams, and
    MAX-reduce stateful amaxes over data-parallel ranks (equal scales on every rank)."""

    name = "precision"

    def __init__(self, cfg: PrecisionConfig):
        self.cfg = cfg
        self.recipe = resolve_recipe(cfg)

    def convert(self, model: nn.Module, ctx: ConvertContext) -> nn.Module:
        c = self.cfg
        model = lpnn.convert(
            model,
            self.recipe,
            skip=tuple(c.skip),
            min_features=c.min_features,
            backend=c.backend,
            log_fn=ctx.say,
        )
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


def _backends(model: nn.Module) -> list:
    """The distinct backends of the model's lptrain layers (one per conversion)."""
    out = {}
    for _, layer in lpnn.quantized_layers(model):
        out.setdefault(id(layer.backend), layer.backend)
    return list(out.values())


def _reduce_max(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def _precision(cfg: TrainConfig) -> Converter | None:
    return None if is_high_precision(cfg.precision) else PrecisionConverter(cfg.precision)


# name -> factory(cfg) returning the converter, or None when the config does not ask for it.
REGISTRY: dict[str, Callable[[TrainConfig], Converter | None]] = {"precision": _precision}


def build(cfg: TrainConfig) -> list[Converter]:
    """The converters this config asks for, in ORDER; raises ConfigError on bad sections."""
    out = []
    for name in ORDER:
        factory = REGISTRY.get(name)
        conv = factory(cfg) if factory else None
        if conv is not None:
            out.append(conv)
    return out


def apply(model: nn.Module, converters: list[Converter], ctx: ConvertContext) -> nn.Module:
    for conv in converters:
        model = conv.convert(model, ctx)
    return model


def after_step(model: nn.Module, converters: list[Converter], step: int) -> None:
    for conv in converters:
        hook = getattr(conv, "after_step", None)
        if hook is not None:
            hook(model, step)


def wrap_step(step_fn, converters: list[Converter]):
    for conv in converters:
        wrap = getattr(conv, "wrap_step", None)
        if wrap is not None:
            step_fn = wrap(step_fn)
    return step_fn


def recipe_dict(cfg: TrainConfig) -> dict | None:
    """The full resolved precision recipe, every field, for the run config and logs."""
    if is_high_precision(cfg.precision):
        return None
    return resolve_recipe(cfg.precision).to_dict()
