"""Step time, model FLOPs utilization and peak memory.

MFU counts the model's FLOPs, not the emulation's: per token 6 * (the weights of every linear
layer, lm_head included) for forward and backward GEMMs, plus 12 * n_layers * dim * seq_len for
causal attention's two batched GEMMs counted in full (PaLM, appendix B). On a CPU the emulated
FP8/FP4 GEMMs run in FP32, so the number only means something against a peak the hardware has
for that arithmetic.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from lptrain.qat import QuantizedLinear
from lptrain.qat.layers import is_hf_conv1d


def _linear_weights(model: nn.Module) -> int:
    """Weights of every linear layer: float ones (ZeRO-3 partitioned: their full size), GPT-2's
    Conv1D, and the frozen stored bases of adapters (`QuantizedLinear`, whose precision recipe
    sits in a weightless `recipe_layer`, not counted twice)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += m.in_features * m.out_features
        elif (isinstance(m, nn.Linear) or is_hf_conv1d(m)) and m.weight is not None:
            total += getattr(m.weight, "ds_numel", m.weight.numel())
    return total


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    linear = _linear_weights(model)
    args = getattr(model, "args", None)
    attention = 12 * args.n_layers * args.dim * seq_len if args is not None else 0
    return 6.0 * linear + attention


def mfu(tokens_per_s: float, per_token: float, peak_flops: float, world: int) -> float:
    """Achieved model FLOP/s over the peak of all ranks."""
    return tokens_per_s * per_token / (peak_flops * world)


def peak_memory_gib() -> dict[str, float]:
    """The accelerator's peak allocated memory, or the process's peak resident set on a CPU."""
    if torch.cuda.is_available():
        return {"perf/peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return {"perf/peak_rss_gib": rss * scale / 2**30}
