"""Looking inside a converted model without changing how it trains: statistics windows and
high-precision recomputation (TransformerEngine's debug features `LogFp8TensorStats` and
`DisableQuantizationLayer`, as two context managers).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from torch import nn

from lptrain.nn.linear import Linear
from lptrain.numerics.stats import OPTIONAL


@contextlib.contextmanager
def stats_window(
    layers: dict[str, Linear], shadows: dict[str, tuple] | None = None, wanted: tuple = OPTIONAL
) -> Iterator[dict[str, dict]]:
    """Collect every training call's statistics of `layers` inside the block, merged per
    operand (`numerics.stats.merge_stats`: the micro-batches of one optimizer step count as one
    tensor); on exit the yielded dict holds {layer name: {'gemm.operand': stats}}. `shadows`
    {layer name: recipes} adds those recipes' statistics on the same operands as
    '<recipe>/<gemm>.<operand>' (nn/shadow.py). Collecting changes no value the layers
    compute. `wanted`: the statistic names asked for; of the opt-in ones
    (numerics/stats.py OPTIONAL) only these are computed, the others are NaN."""
    out: dict[str, dict] = {}
    shadows = shadows or {}
    for name, layer in layers.items():
        layer.open_stats_window(shadows.get(name, ()), wanted)
    try:
        yield out
    finally:
        for name, layer in layers.items():
            stats = layer.close_stats_window()
            if stats:
                out[name] = stats


@contextlib.contextmanager
def disable_quantization(layers: nn.Module | Iterable[Linear]) -> Iterator[None]:
    """Inside the block the lptrain layers (of a model, or the given ones) compute plain
    `F.linear` in their parameters' dtype: the high-precision reference of the same network."""
    if isinstance(layers, nn.Module):
        layers = [m for m in layers.modules() if isinstance(m, Linear)]
    layers = list(layers)
    before = [layer.quantization_enabled for layer in layers]
    for layer in layers:
        layer.quantization_enabled = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, before, strict=True):
            layer.quantization_enabled = flag
