"""Shared quantized inputs: layers that read the same tensor (q/k/v of attention, w1/w3 of
SwiGLU) quantize it once for their forward GEMM and keep one copy for backward.

TransformerEngine and torchao do the same. A copy is shared only where sharing cannot change a
bit: the `output` GEMM's input spec is a pure function of the tensor (round-to-nearest, no
rotation, no scaling history: per-layer delayed or sample-and-hold scales differ between layers,
and stochastic rounding or random signs draw from each layer's own stream), the layers agree on
that spec and on the reduction padding, and no statistics are being collected (each layer
records its own). And only a copy the layers keep for backward anyway (their weight gradient
reuses it, nn/reuse.py): a copy used by the forward GEMM alone is freed right after it, and
holding it for the next reader would keep it alive as long as the input (until backward where
the layers save the input itself). For the same reason nothing is shared with gradients off
(`torch.no_grad`, evaluation): no layer keeps a copy for a backward, and an input the caller
still holds after the forward would keep the shared copy alive with it. Everything else
quantizes per layer, as before.

The copies live in a `SharedInputs` held by the model's backend (one per `convert`), keyed by
the input tensor's identity and version counter and dropped when the tensor is freed, so a copy
lives no longer than the forward that made it (or the tensor it quantizes) and is never module
state. A recomputed forward (activation checkpointing) reads a new tensor and quantizes it again:
the same values, and nothing stateful is updated twice because nothing stateful is shared.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lptrain.nn.call import CallContext


def share_key(call: "CallContext", x: torch.Tensor) -> tuple | None:
    """The key under which layers share `x`'s quantized copy for the `output` GEMM, or None
    when this call must quantize it itself (see the module docstring)."""
    gr = call.recipe.gemm("output")
    spec = gr.a
    deterministic = (
        spec is not None
        and spec.rounding == "nearest"
        and spec.hadamard is None
        and spec.scaling != "delayed"
        and spec.amax_refresh == 1
    )
    kept = call.grad_enabled and (
        call.recipe.backward_operands == "reuse" or ("grad_weight", "input") in call.aliases
    )
    if not (deterministic and kept) or call.collect or gr.accumulate != "fp32" or x.is_inference():
        return None
    if spec.tile is not None and spec.tile[0] != 1:  # rows padded to the tile per call
        return None
    # The weight spec fixes the reduction axis' padding (nn/backends/emulated.py `granularity`).
    return (spec, gr.b, call.recipe.trust_mask, x.dtype, tuple(x.shape))


class SharedInputs:
    """Quantized copies of layer inputs, by (input tensor, key); see the module docstring."""

    def __init__(self):
        self._by_input: dict[int, tuple[int, dict]] = {}

    def get(self, x: torch.Tensor, key: tuple):
        entry = self._by_input.get(id(x))
        if entry is None or entry[0] != x._version:  # x was written in place since
            return None
        return entry[1].get(key)

    def put(self, x: torch.Tensor, key: tuple, value) -> None:
        entry = self._by_input.get(id(x))
        if entry is None:
            weakref.finalize(x, self._by_input.pop, id(x), None)
        if entry is None or entry[0] != x._version:
            entry = (x._version, {})
            self._by_input[id(x)] = entry
        entry[1][key] = value

    def __len__(self) -> int:
        return len(self._by_input)
