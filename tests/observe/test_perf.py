"""Model FLOPs per token, MFU and peak memory (observe/perf.py)."""

from __future__ import annotations

import pytest

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


def test_flops_count_stored_bases_once():
    """LoRA on an int4 base under a precision recipe: the base is a QuantizedLinear whose
    recipe layer has no weight (this crashed the trainer's set-up on None.numel()). MFU
    counts the model's GEMMs: the base once, the small adapter GEMMs not."""
    import lptrain
    from lptrain import lora

    model = build_model(ModelConfig(preset="nano"), vocab_size=257, max_seq_len=64)
    want = perf.flops_per_token(model, 64)
    lptrain.convert(model, "fp8-current")
    lora.apply(model, lora.AdapterConfig(type="lora", r=4, base="int4"))
    assert perf.flops_per_token(model, 64) == want  # the base's weights, once; B·A not counted
