"""What QAT and adapters need to know about a linear layer, whatever its class.

Eligible layers: `nn.Linear` (exactly, like `lptrain.convert`), `lptrain.nn.Linear` (and its
GPT-2 `Conv1D`), and `transformers`' `Conv1D`. `weight_nk` is the weight as (out, in);
`run_gemm` runs the layer's own GEMM with another weight: a plain `F.linear` for float
layers, the recipe's three quantized GEMMs for `lptrain.nn.Linear` (QAT on top of an FP8/FP4
training recipe composes: the QAT quantizer defines the weight, the recipe quantizes the
GEMM operands).
"""

from __future__ import annotations

import copy
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import lptrain.nn as lpnn
from lptrain.nn.select import DEFAULT_SKIP, ModuleFilter, excluded, globs


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

    if isinstance(base, lpnn.Linear) and base.recipe.quantizes:
        layer = copy.deepcopy(base)
        layer.register_parameter("weight", None)
        exported.recipe_layer = layer.requires_grad_(False)
    else:
        exported.set_bias(base.bias)


def select(
    model: nn.Module,
    targets: Iterable[str] = ("*",),
    skip: Iterable[str] = DEFAULT_SKIP,
    module_filter_fn: ModuleFilter | None = None,
) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, parent, child name, layer) of every eligible linear layer selected by
    (targets, skip, module_filter_fn) (lptrain/nn/select.py), in module order (listed first,
    so swapping is safe)."""
    targets, skip = globs(targets), globs(skip)
    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if is_linear(child) and not excluded(full, child, targets, skip, module_filter_fn):
                found.append((full, parent, child_name, child))
    return iter(found)
