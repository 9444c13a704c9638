"""backend: te: TransformerEngine's `te.pytorch.Linear` for the recipes TE implements, under
the TE recipe `te_mapping.py` maps each lptrain recipe to (data; refusals carry the reason).

TE runs whole layers (its own fused quantize + cuBLASLt GEMMs, forward and backward), so this
backend swaps layers in `lptrain.convert(model, recipe, backend='te')` instead of running the
three GEMMs of lptrain.nn.Linear. Its kernels are NVIDIA's, not checked against lptrain's
reference bit for bit, which is why `backend: auto` never picks it. `pip install 'lptrain[te]'`
on a CUDA machine.

Known differences beyond the kernels: TE reduces delayed-scaling amaxes and updates scales at
the exit of each autocast region (here: each layer's forward) and, for delayed scaling, caches
FP8 weights per micro-batch its own way.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from lptrain.nn.backends.te_mapping import TEMapping, TEUnsupported, te_mapping
from lptrain.nn.recipe import Recipe

__all__ = ["TEBackend", "TEMapping", "TEUnsupported", "te_mapping", "te_missing"]


def te_missing() -> str | None:
    if importlib.util.find_spec("transformer_engine") is None:
        return "TransformerEngine is not installed (pip install 'lptrain[te]' on a CUDA machine)"
    return None


class TEBackend:
    """Swaps linear layers for TE's Linear running under the mapped TE recipe."""

    name = "te"

    def __init__(self, recipe: Recipe, mapping: TEMapping):
        self.recipe = recipe
        self.mapping = mapping
        self._te_recipe = None

    @classmethod
    def create(cls, recipe: Recipe, device: torch.device) -> "TEBackend":
        why = te_missing()
        if why:
            raise ValueError(f"backend 'te' is not available: {why}")
        if device.type != "cuda":
            raise ValueError(f"backend 'te' needs a CUDA device (the model is on {device})")
        try:
            mapping = te_mapping(recipe)
        except TEUnsupported as exc:
            raise ValueError(f"backend 'te' cannot run it: {exc}") from None
        return cls(recipe, mapping)

    def supports(self, recipe: Recipe) -> str | None:
        try:
            te_mapping(recipe)
        except TEUnsupported as exc:
            return str(exc)
        return None

    def after_step(self) -> None:
        """TE keeps its own state (amax histories, FP8 weight caches)."""

    def describe(self) -> str:
        kw = ", ".join(f"{k}={v}" for k, v in self.mapping.kwargs.items())
        return f"transformer_engine.common.recipe.{self.mapping.cls}({kw})"

    def make_layer(self, layer: nn.Module, transposed: bool = False) -> nn.Module:
        """A TE Linear holding a copy of `layer`'s parameters (Conv1D: `transposed`)."""
        if self._te_recipe is None:
            self._te_recipe = self.mapping.build()
        w = layer.weight.t() if transposed else layer.weight
        cls = _te_linear_class()
        new = cls(
            w.shape[1],
            w.shape[0],
            bias=layer.bias is not None,
            params_dtype=w.dtype,
            device=w.device,
            te_recipe=self._te_recipe,
            lp_recipe=self.recipe.name,
        )
        with torch.no_grad():
            new.weight.copy_(w)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        new.train(layer.training)
        return new


_TE_LINEAR = None


def _te_linear_class():
    """te.pytorch.Linear whose forward runs inside TE's autocast with the mapped recipe (built
    on first use: importing this module never imports TE)."""
    global _TE_LINEAR
    if _TE_LINEAR is not None:
        return _TE_LINEAR
    import transformer_engine.pytorch as te  # optional dependency (the te extra)

    def autocast(recipe):
        if hasattr(te, "autocast"):  # TE >= 2.8
            return te.autocast(enabled=True, recipe=recipe)
        return te.fp8_autocast(enabled=True, fp8_recipe=recipe)

    class TELinear(te.Linear):
        def __init__(self, *args, te_recipe, lp_recipe: str, **kw):
            super().__init__(*args, **kw)
            self.te_recipe = te_recipe
            self.lp_recipe = lp_recipe

        def forward(self, x, *args, **kw):
            with autocast(self.te_recipe):
                return super().forward(x, *args, **kw)

        def extra_repr(self) -> str:
            return f"recipe={self.lp_recipe}, backend=te"

    _TE_LINEAR = TELinear
    return TELinear
