"""Model FLOPs per token, MFU and peak memory (observe/perf.py)."""

from __future__ import annotations

import pytest

import lptrain.nn as lpnn
from lptrain import lora
from lptrain.config.schema import ModelConfig
from lptrain.models.decoder import build_model
from lptrain.observe import perf


def test_flops_per_token_and_mfu():
    model = build_model(ModelConfig(preset="nano"), vocab_size=257, max_seq_len=64)
    d, f, v, layers = 64, 128, 320, 2  # nano: dim 64, ffn 128, vocab padded to 320
    linear = layers * (4 * d * d + 3 * d * f) + v * d  # q, k, v, o; w1, w3, w2; lm_head
    want = 6 * linear + 12 * layers * d * 64  # + causal attention over 64 tokens
    assert perf.flops_per_token(model, 64) == want
    assert perf.mfu(1000.0, want, peak_flops=1e12, world=2) == pytest.approx(1000 * want / 2e12)
    assert perf.peak_memory_gib()["perf/peak_rss_gib"] > 0.05


@pytest.mark.parametrize("adapters", [dict(type="l4q", group_size=32), dict(base="int4")])
def test_adapter_layers_count_their_gemms(adapters):
    """L4Q and stored-quantized LoRA bases under an FP8 recipe: the same FLOPs as the plain
    model (their recipe layers hold no weight: this raised AttributeError)."""
    model = build_model(ModelConfig(preset="nano"), vocab_size=257, max_seq_len=64)
    want = perf.flops_per_token(model, 64)
    lora.apply(lpnn.convert(model, "fp8-current", backend="emulated"), adapters)
    assert perf.flops_per_token(model, 64) == want
