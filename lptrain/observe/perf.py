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

from lptrain.lora import L4QLinear
from lptrain.qat import QuantizedLinear
from lptrain.qat.layers import is_hf_conv1d


def _gemm_weights(m: nn.Module) -> int:
    """The weights one layer multiplies by: an nn.Linear's or GPT-2 Conv1D's own (a ZeRO-3
    partitioned one's full count), a stored-quantized or L4Q layer's in x out. A weightless
    lptrain.nn.Linear runs such a layer's recipe GEMMs and is counted there."""
    if isinstance(m, (QuantizedLinear, L4QLinear)):
        return m.in_features * m.out_features
    if (isinstance(m, nn.Linear) or is_hf_conv1d(m)) and m.weight is not None:
        return getattr(m.weight, "ds_numel", m.weight.numel())
    return 0


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    linear = sum(_gemm_weights(m) for m in model.modules())
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
