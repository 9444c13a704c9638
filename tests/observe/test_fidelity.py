"""Gradient fidelity on a probe batch (observe/fidelity.py)."""

from __future__ import annotations

import torch

import lptrain
from lptrain.config.schema import ModelConfig
from lptrain.models.decoder import build_model
from lptrain.observe.fidelity import gradient_fidelity
from lptrain.observe.layers import linear_layers


def _model_and_batch(recipe: str | None):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="nano"), vocab_size=257, max_seq_len=32)
    if recipe:
        lptrain.convert(model, recipe, skip=["lm_head"])
    batch = torch.randint(0, 257, (4, 33), generator=torch.Generator().manual_seed(1))
    return model, batch


def test_exactly_one_when_nothing_is_quantized():
    model, batch = _model_and_batch(None)  # fp32: the recipe's gradient is the reference
    got = gradient_fidelity(model, batch, linear_layers(model, ["*"]))
    assert len(got) == 15  # 2 blocks x 7 projections + lm_head
    assert all(cos == 1.0 and align == 1.0 for cos, align in got.values()), got


def test_fp4_is_close_but_not_exact_and_the_probe_changes_nothing():
    model, batch = _model_and_batch("nvfp4")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    got = gradient_fidelity(model, batch, linear_layers(model, ["*"]))
    quantized = [cos for name, (cos, _) in got.items() if name != "lm_head"]
    assert all(0.8 < c < 0.9999 for c in quantized), got
    assert got["lm_head"][0] > 0.99  # high precision itself; only its input differs
    # Nothing training uses moved: weights, quantizer state and counters, torch's generator,
    # the .grad fields, the mode.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters()) and model.training
