"""The model (models/decoder.py): presets, plain Linears, causality, activation checkpointing."""

from __future__ import annotations

import numpy as np
import torch

from lptrain.config.schema import ModelConfig
from lptrain.models import decoder
from lptrain.models.decoder import build_model
from tests.helpers import train_losses


def test_model_linears_are_plain_and_loss_is_near_uniform_at_init():
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="nano"), 257, 16)
    kinds = {type(mod) for name, mod in m.named_modules() if name.endswith(("wq", "w1", "lm_head"))}
    assert kinds == {torch.nn.Linear}
    loss = m(torch.randint(0, 257, (2, 17)))
    assert abs(loss.item() - np.log(320)) < 0.2  # vocab padded to 320
    untied = build_model(ModelConfig(preset="nano", tie_embeddings=False), 257, 16)
    assert untied.lm_head.weight is not untied.embed.weight
    assert m.lm_head.weight is m.embed.weight


def test_causal_attention_ignores_the_future():
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="nano"), 257, 16).eval()
    x = torch.randint(0, 257, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 257
    assert torch.allclose(m.logits(x)[0, :10], m.logits(y)[0, :10], atol=1e-6)


def test_model_presets_sizes():
    sizes = {}
    for name in ("tiny", "125m", "1b", "7b"):
        a = decoder.model_args(ModelConfig(preset=name), 32000, 2048)
        emb = a.vocab_size * a.dim * (1 if a.tie_embeddings else 2)
        kv = a.dim * a.dim // a.n_heads * a.n_kv_heads
        sizes[name] = emb + a.n_layers * (2 * a.dim * a.dim + 2 * kv + 3 * a.dim * a.ffn_dim)
    assert 100e6 < sizes["125m"] < 170e6
    assert 0.9e9 < sizes["1b"] < 1.3e9
    assert 6.0e9 < sizes["7b"] < 7.5e9
    tiny = decoder.build_model(ModelConfig(preset="tiny"), 257, 128)
    assert 2e5 < decoder.count_params(tiny) < 1e6


def test_activation_checkpointing_gives_the_same_losses(cli, tmp_path):
    """model.checkpointing recomputes every block in backward: with FP8 delayed scaling and
    stochastic rounding (nvfp4) the losses are bit for bit those without it."""
    for recipe in ("tiny-fp8.yaml", "tiny-nvfp4.yaml"):
        runs = {}
        for flag in ("false", "true"):
            run_dir = tmp_path / f"{recipe}-{flag}"
            cli(recipe, "run.max_steps=4", f"model.checkpointing={flag}", run_dir=run_dir)
            runs[flag] = [float(x).hex() for x in train_losses(run_dir)]
        assert runs["true"] == runs["false"] and len(runs["true"]) == 4, recipe
