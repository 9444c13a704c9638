"""`LoRALinear`: y = base(x) + (α/r) · B·A·dropout(x), peft's conventions (B = 0 at init, A
Kaiming-uniform like `nn.Linear`, scaling α/r, dropout on the adapter input only).

The frozen base is either the original layer (`base="none"`: nn.Linear or an
`lptrain.nn.Linear` running its recipe) or a `QuantizedLinear` that stores the weight in
bf16 / fp8 / int8 / int4 / nvfp4 / nf4 (QLoRA's) and dequantizes it on the fly; an
`lptrain.nn.Linear` base keeps its recipe's GEMMs with the dequantized weight. Only `lora_A`
and `lora_B` train.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.errors import ConfigError
from lptrain.qat.layers import features, weight_nk
from lptrain.qat.quantized import QuantizedLinear

BASES = ("none", "bf16", "fp8", "int8", "int4", "nvfp4", "nf4")


def quantized_base(layer: nn.Module, fmt: str, group_size: int) -> QuantizedLinear:
    """`layer`'s weight stored in `fmt`; an lptrain recipe layer keeps its GEMMs."""
    recipe = isinstance(layer, lpnn.Linear) and layer.recipe.quantizes
    q = QuantizedLinear.from_weight(
        weight_nk(layer), fmt, bias=None if recipe else layer.bias, group_size=group_size
    )
    if recipe:  # the recipe's three GEMMs with the dequantized weight; the float weight goes
        layer.register_parameter("weight", None)
        q.recipe_layer = layer.requires_grad_(False)
    return q


def check_rank(r: int, in_features: int, out_features: int) -> None:
    """1 <= r <= min(in, out). peft accepts a larger r, but B·A (out x r)(r x in) has rank at
    most min(in, out): the extra rank adds parameters and memory, never capacity (and r=1e9
    ran out of memory instead of saying so)."""
    if r < 1:
        raise ConfigError("r", f"must be >= 1, got {r}")
    limit = min(in_features, out_features)
    if r > limit:
        raise ConfigError(
            "r",
            f"{r} exceeds min(in_features, out_features) = {limit}: B·A has rank <= {limit}, "
            "so a larger r adds parameters, not capacity",
        )


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        base_format: str = "none",
        group_size: int = 64,
    ):
        super().__init__()
        if base_format not in BASES:
            raise ConfigError("base", f"{base_format!r} is not one of {BASES}")
        self.in_features, self.out_features = features(base)
        check_rank(r, self.in_features, self.out_features)
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.base_format, self.group_size = base_format, group_size
        w = weight_nk(base)
        if base_format == "none":
            self.base_layer = base.requires_grad_(False)
        else:
            self.base_layer = quantized_base(base, base_format, group_size)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and peft's) init
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """(α/r) · B·A, the adapter's (out, in) weight update."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        a = self.lora_dropout(x).to(self.lora_A.dtype)
        lora = (a @ self.lora_A.T) @ self.lora_B.T  # (.., r) then (.., out)
        return y + (lora * self.scaling).to(y.dtype)

    # -- merge / unmerge ------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B·A into the base. A float base adds it in place (exact up to the base dtype's
        rounding); a quantized base is dequantized, added to and re-quantized (lossy)."""
        if not self.merged:
            self._add(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            if self.base_format != "none":
                warnings.warn(
                    "LoRALinear.unmerge on a quantized base re-quantizes W - (α/r)BA: the base "
                    "does not come back exactly",
                    stacklevel=2,
                )
            self._add(-self.delta_weight())
            self.merged = False

    def _add(self, delta: torch.Tensor) -> None:
        base = self.base_layer
        if isinstance(base, QuantizedLinear):
            new = QuantizedLinear.from_weight(
                base.dequantize() + delta.float(), base.fmt, bias=base.bias,
                group_size=base.group_size,
            )  # fmt: skip
            new.recipe_layer = base.recipe_layer
            self.base_layer = new
        else:  # (out, in) as the GEMM sees it: a Conv1D's (transformers' or ours) is a view
            weight_nk(base).add_(delta.to(base.weight.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, base={self.base_format}, merged={self.merged}"
        )
