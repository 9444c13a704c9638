"""What QAT and adapters need to know about a linear layer, whatever its class.

Eligible layers: `nn.Linear` (exactly, like `lptrain.convert`), `lptrain.nn.Linear` (and its
GPT-2 `Conv1D`), and `transformers`' `Conv1D`. `weight_nk` is the weight as (out, in);
`run_gemm` runs the layer's own GEMM with another weight: a plain `F.linear` for float
layers, the recipe's three quantized GEMMs for `lptrain.nn.Linear` (QAT on top of an FP8/FP4
training recipe composes: the QAT quantizer defines the weight, the recipe quantizes the
GEMM operands).
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import lptrain.nn as lpnn


def is_hf_conv1d(m: nn.Module) -> bool:
    t = type(m)
    return t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and hasattr(m, "nf")


def is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or isinstance(m, lpnn.Linear) or is_hf_conv1d(m)


def features(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features)."""
    if is_hf_conv1d(m):
        return m.weight.shape[0], m.weight.shape[1]
    return m.in_features, m.out_features


def weight_nk(m: nn.Module) -> torch.Tensor:
    if isinstance(m, lpnn.Linear):
        return m.weight_nk()
    return m.weight.t() if is_hf_conv1d(m) else m.weight


def run_gemm(m: nn.Module, x: torch.Tensor, w_nk: torch.Tensor) -> torch.Tensor:
    """y = x · w_nkᵀ + bias through `m`'s own GEMM (its recipe for lptrain layers)."""
    if isinstance(m, lpnn.Linear):
        return m.gemm(x, w_nk)
    return F.linear(x, w_nk, m.bias)


def keep_base_gemm(exported: nn.Module, base: nn.Module) -> None:
    """Give an exported QuantizedLinear the GEMM `base` ran in training: a quantizing lptrain
    layer's recipe and state (a weightless copy of it), else just its bias."""
    import copy

    if isinstance(base, lpnn.Linear) and base.recipe.quantizes:
        layer = copy.deepcopy(base)
        layer.register_parameter("weight", None)
        exported.recipe_layer = layer.requires_grad_(False)
    else:
        exported.set_bias(base.bias)


def matches(name: str, patterns: Iterable[str]) -> str | None:
    """The first glob matching the full dotted name or its last part, else None."""
    leaf = name.rsplit(".", 1)[-1]
    for p in patterns:
        if fnmatch.fnmatch(name, p) or fnmatch.fnmatch(leaf, p):
            return p
    return None


def select(
    model: nn.Module, targets: Iterable[str] = ("*",), skip: Iterable[str] = ()
) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, parent, child name, layer) of every eligible linear layer whose name matches
    a target glob and no skip glob, in module order (listed first, so swapping is safe)."""
    targets, skip = tuple(targets), tuple(skip)
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if is_linear(child) and matches(full, targets) and not matches(full, skip):
                found.append((full, parent, child_name, child))
    return iter(found)
