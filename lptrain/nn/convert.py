"""Module swap: `convert(model, recipe)` replaces eligible linear layers in place (before
DeepSpeed or any wrapper); `unconvert` restores plain layers with the same parameters.

Eligible: `nn.Linear` (exactly, not other frameworks' subclasses), `transformers`' GPT-2
`Conv1D` (a linear layer with a transposed weight) and already converted layers, which get the
new recipe with fresh quantizer state ("re-recipe"). The backend is resolved once per model
and, with what was converted and skipped and why, logged as one summary.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from lptrain.nn.backends import resolve as resolve_backend
from lptrain.nn.call import stable_seed
from lptrain.nn.linear import Linear
from lptrain.nn.recipe import Recipe
from lptrain.nn.resolve import resolve
from lptrain.nn.select import DEFAULT_SKIP, ModuleFilter, excluded, globs, matches

log = logging.getLogger("lptrain")


class Conv1D(Linear):
    """`transformers`' GPT-2 Conv1D (y = x W + b, W of shape (in, out)) with a recipe.

    The weight keeps Conv1D's layout and name, so Hugging Face checkpoints load unchanged; the
    forward hands W^T to the same three GEMMs as Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kw):
        super().__init__(in_features, out_features, bias, **kw)
        self.weight = nn.Parameter(self.weight.detach().t().contiguous())

    @classmethod
    def from_float(cls, conv: nn.Module, recipe, *, backend="auto", seed=None) -> "Conv1D":
        in_f, out_f = conv.weight.shape
        new = cls(in_f, out_f, conv.bias is not None, device="meta", recipe=recipe,
                  backend=backend, seed=seed)  # fmt: skip
        new.weight, new.bias = conv.weight, conv.bias
        new.init_quantizer_state(int(new.seed) if seed is None else seed, conv.weight.device)
        new.train(conv.training)
        return new

    def weight_nk(self) -> torch.Tensor:
        return self.weight.t()


def _is_hf_conv1d(m: nn.Module) -> bool:
    t = type(m)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and hasattr(m, "nf")


@dataclass
class ConversionSummary:
    recipe: str
    backend: str
    reason: str
    converted: list[str] = field(default_factory=list)
    re_recipe: list[tuple[str, str]] = field(default_factory=list)  # (layer, old recipe)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (layer, why)
    unmatched_skips: list[str] = field(default_factory=list)

    def text(self) -> str:
        parts = [
            f"convert: {len(self.converted)} layers to {self.recipe} "
            f"(backend {self.backend}: {self.reason})"
        ]
        if self.re_recipe:
            olds = sorted({old for _, old in self.re_recipe})
            parts.append(
                f"{len(self.re_recipe)} re-recipe'd from {', '.join(olds)} (quantizer state reset)"
            )
        if self.skipped:
            shown = ", ".join(f"{n} ({why})" for n, why in self.skipped[:8])
            more = f" and {len(self.skipped) - 8} more" if len(self.skipped) > 8 else ""
            parts.append(f"skipped {len(self.skipped)}: {shown}{more}")
        return "; ".join(parts)


def _skip_reason(name: str, layer: nn.Module, selection, min_features: int, hits):
    targets, skip, module_filter_fn = selection
    hit = matches(name, skip)
    if hit:
        hits.add(hit)
        return f"skip {hit!r}"
    why = excluded(name, layer, targets, (), module_filter_fn)
    if why:
        return why
    w = layer.weight
    smaller = min(getattr(w, "ds_shape", w.shape))
    if smaller < min_features:
        return f"min_features {min_features} > {smaller}"
    return None


def convert(
    model: nn.Module,
    recipe: str | Recipe | dict,
    *,
    targets: str | Iterable[str] = ("*",),
    skip: str | Iterable[str] | None = None,
    module_filter_fn: ModuleFilter | None = None,
    min_features: int = 0,
    backend: str = "auto",
    seed: int = 0,
    log_fn: Callable[[str], None] | None = None,
) -> nn.Module:
    """Swap every eligible linear layer of `model` for its lptrain version, in place.

    recipe: a name (`lptrain.recipes.names()`), a Recipe, an inline dict or a YAML path.
    targets / skip / module_filter_fn: which layers (lptrain/nn/select.py; the same signature
    as qat.prepare and lora.apply); skip None is DEFAULT_SKIP (the output head), and a skip
    pattern you give that matches nothing is warned about. min_features: skip layers whose
    smaller dimension is below this. Parameters, devices and dtypes are kept (the same
    tensors). Each layer's random stream is seeded from (seed, its name). Recipes that
    quantize nothing (fp32, bf16) leave plain layers alone. The summary goes to `log_fn`
    (default: the `lptrain` logger at INFO). Returns the model.
    """
    recipe = resolve(recipe)
    warn_unmatched = skip is not None
    targets, skip = globs(targets), globs(DEFAULT_SKIP if skip is None else skip)
    if type(model) is nn.Linear:
        raise ValueError(
            "convert() swaps children in place; wrap a bare nn.Linear in a module "
            "or use lptrain.nn.Linear.from_float(linear, recipe)"
        )
    resolved = resolve_backend(backend, recipe, _device_of(model), whole_layers=True)
    summary = ConversionSummary(recipe.name, resolved[0].name, resolved[1])
    make_layer = getattr(resolved[0], "make_layer", None)  # backend 'te': TE's own Linear
    hits: set[str] = set()
    candidates = list(_candidates(model))
    for name, parent, child_name, child in candidates:
        why = _skip_reason(name, child, (targets, skip, module_filter_fn), min_features, hits)
        if why:
            summary.skipped.append((name, why))
            continue
        if isinstance(child, Linear) and make_layer is None:
            if child.recipe == recipe:
                continue
            summary.re_recipe.append((name, child.recipe.name))
            new = type(child).from_float(child, recipe, backend=resolved, seed=int(child.seed))
        elif not recipe.quantizes:
            continue
        elif make_layer is not None:
            new = make_layer(child, transposed=isinstance(child, Conv1D) or _is_hf_conv1d(child))
        else:
            cls = Conv1D if _is_hf_conv1d(child) else Linear
            new = cls.from_float(child, recipe, backend=resolved, seed=stable_seed(seed, name))
        summary.converted.append(name)
        setattr(parent, child_name, new)
    summary.unmatched_skips = [p for p in skip if p not in hits] if warn_unmatched else []
    if summary.unmatched_skips:
        warnings.warn(
            f"lptrain.convert: skip patterns matched no layer: {summary.unmatched_skips}",
            stacklevel=2,
        )
    names = [c[0] for c in candidates]
    lost = [p for p in targets if names and not any(matches(n, (p,)) for n in names)]
    if lost:
        warnings.warn(f"lptrain.convert: target patterns matched no layer: {lost}", stacklevel=2)
    if summary.converted:
        (log_fn or log.info)(summary.text())
    return model


def _device_of(model: nn.Module) -> torch.device | None:
    """Where the model's parameters live (None: no parameters, or still on 'meta')."""
    p = next(model.parameters(), None)
    return p.device if p is not None and p.device.type != "meta" else None


def unconvert(model: nn.Module) -> nn.Module:
    """Replace every lptrain layer by its plain version holding the same parameters."""
    for _, parent, child_name, child in list(_modules_of(model, Linear)):
        if isinstance(child, Conv1D):
            from transformers.pytorch_utils import (
                Conv1D as HFConv1D,  # optional dependency (the hf extra)
            )

            with torch.device("meta"):
                plain = HFConv1D(child.out_features, child.in_features)
        else:
            with torch.device("meta"):
                plain = nn.Linear(child.in_features, child.out_features, child.bias is not None)
        plain.weight = child.weight
        plain.bias = child.bias
        plain.train(child.training)
        setattr(parent, child_name, plain)
    return model


def _modules_of(model: nn.Module, match) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    test = match if callable(match) and not isinstance(match, type) else None
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if test(child) if test else isinstance(child, match):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                yield full, parent, child_name, child


def _candidates(model: nn.Module):
    # Exactly nn.Linear (not other frameworks' subclasses), HF Conv1D, or ours (re-recipe).
    return _modules_of(
        model, lambda m: type(m) is nn.Linear or isinstance(m, Linear) or _is_hf_conv1d(m)
    )


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, Linear]]:
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            yield name, module


def seed_quantizers(model: nn.Module, seed: int, rank: int = 0) -> None:
    """Seed every layer's random stream from (seed, rank, layer name)."""
    for name, layer in quantized_layers(model):
        layer.reseed(stable_seed(seed * 65_537 + rank, name))


def set_amax_reduce(model: nn.Module, fn) -> None:
    """fn(amax) -> amax reduced (MAX) over the data-parallel group, for stateful scaling."""
    for _, layer in quantized_layers(model):
        layer._amax_reduce = fn  # kept for recipes set later (Linear.set_recipe)
        if layer.quant_state is not None:
            for state in layer.quant_state.values():
                state.amax_reduce = fn


_PER_RANK = ("seed", "int32_overflows")


def quantizer_state(model: nn.Module) -> dict:
    """Per-rank state that the rank-0 module state_dict does not carry: each layer's seed
    (ranks draw different random numbers) and its overflow counter."""
    return {
        name: {k: getattr(layer, k).clone() for k in _PER_RANK}
        for name, layer in quantized_layers(model)
    }


def load_quantizer_state(model: nn.Module, state: dict) -> None:
    layers = dict(quantized_layers(model))
    missing = set(layers) - set(state)
    if missing:
        raise ValueError(f"quantizer state lacks layers: {sorted(missing)[:5]}")
    for name, layer in layers.items():
        for k in _PER_RANK:
            if k in state[name]:
                getattr(layer, k).copy_(torch.as_tensor(state[name][k]))


def collect_stats(model: nn.Module, every: int) -> None:
    for _, layer in quantized_layers(model):
        layer.collect_stats(every)


def layer_stats(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """The latest statistics of every layer: {layer: {'gemm.operand': {amax, ...}}}."""
    return {
        name: dict(layer.last_stats) for name, layer in quantized_layers(model) if layer.last_stats
    }
