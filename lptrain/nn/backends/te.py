"""backend: te: TransformerEngine's `te.pytorch.Linear` for the recipes TE implements, under
the TE recipe `te_mapping.py` maps each lptrain recipe to (data; refusals carry the reason).

TE runs whole layers (its own fused quantize + cuBLASLt GEMMs, forward and backward), so this
backend swaps layers in `lptrain.convert(model, recipe, backend='te')` instead of running the
three GEMMs of lptrain.nn.Linear. Its kernels are NVIDIA's, not checked against lptrain's
reference bit for bit, which is why `backend: auto` never picks it. `pip install 'lptrain[te]'`
on a CUDA machine.

Known differences beyond the kernels: TE reduces delayed-scaling amaxes and updates scales at
the exit of each autocast region (here: each layer's forward) and, for delayed scaling, caches
FP8 weights per micro-batch its own way; te_mapping.py's docstring lists the numerical ones.

Under ZeRO-3 `deepspeed.zero.Init` a layer's parameters are empty partitions (shape (0,)): the
TE layer is built on the meta device from their full shape (`ds_shape`) and takes the
partitioned parameters themselves, so no rank ever holds a whole weight (DeepSpeed gathers
them around each forward, as for any module).
"""

from __future__ import annotations

import importlib.util
import re

import torch
from torch import nn

from lptrain.nn.backends.base import BackendError
from lptrain.nn.backends.te_mapping import MIN_TE, TEMapping, TEUnsupported, te_mapping
from lptrain.nn.recipe import Recipe

__all__ = ["TEBackend", "TEMapping", "TEUnsupported", "te_mapping", "te_missing", "te_version"]


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
            raise BackendError(f"backend 'te' is not available: {why}")
        if device.type != "cuda":
            raise BackendError(f"backend 'te' needs a CUDA device (the model is on {device})")
        try:
            mapping = te_mapping(recipe)
        except TEUnsupported as exc:
            raise BackendError(f"backend 'te' cannot run it: {exc}") from None
        need, have = MIN_TE.get(mapping.cls), te_version()
        if need and _release(have) < need:
            want = ".".join(map(str, need))
            raise BackendError(
                f"backend 'te': recipe {recipe.name!r} maps to {mapping.cls}, which needs "
                f"TransformerEngine >= {want} (installed: {have}): pip install "
                f"'transformer_engine[pytorch]>={want}'"
            )
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
        """A TE Linear holding a copy of `layer`'s parameters (Conv1D: `transposed`), or, for
        a ZeRO-3 partitioned layer, the partitioned parameters themselves."""
        if self._te_recipe is None:
            self._te_recipe = self.mapping.build()
        if hasattr(layer.weight, "ds_shape"):
            return self._partitioned_layer(layer, transposed)
        w = layer.weight.t() if transposed else layer.weight
        new = self._new(layer, w.shape, w.dtype, w.device)
        with torch.no_grad():
            new.weight.copy_(w)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def _partitioned_layer(self, layer: nn.Module, transposed: bool) -> nn.Module:
        # Built under deepspeed.zero.Init: weight.shape is (0,) on every rank; ds_shape is the
        # (out, in) the TE layer must have. Meta device: nothing allocated, then the
        # partitioned parameters replace TE's (no copy: they hold no values here).
        if transposed:
            raise BackendError(
                "backend 'te' cannot swap a Conv1D (transposed weight) built under ZeRO-3 "
                "deepspeed.zero.Init: set deepspeed.zero_init: false"
            )
        w = layer.weight
        new = self._new(layer, w.ds_shape, w.dtype, torch.device("meta"))
        new.weight = w
        if layer.bias is not None:
            new.bias = layer.bias
        return new

    def _new(self, layer: nn.Module, shape, dtype, device) -> nn.Module:
        """TE's Linear for a (out, in) weight, in `layer`'s train/eval mode."""
        out_features, in_features = shape
        new = _te_linear_class()(
            in_features,
            out_features,
            bias=layer.bias is not None,
            params_dtype=dtype,
            device=device,
            te_recipe=self._te_recipe,
            lp_recipe=self.recipe.name,
        )
        new.train(layer.training)
        return new


def te_version() -> str:
    """The installed TransformerEngine's version string (imports TE: only once chosen)."""
    import transformer_engine  # optional dependency (the te extra)

    return str(transformer_engine.__version__)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as '2.8.0+cu12' (unparsable: (0, 0))."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else (0, 0)


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
