"""Model conversion (nn/convert.py): skip globs, min_features, unconvert, amax reduction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lptrain
import lptrain.nn as lpnn
from lptrain import recipes
from lptrain.nn import Linear
from lptrain.testing import sqnr_db

from .conftest import Nested, _build


def test_convert_skip_min_features_nested_and_unconvert():
    torch.manual_seed(0)
    m = Nested()
    params = {n: p for n, p in m.named_parameters()}
    lptrain.convert(m, "nvfp4", skip=("lm_head",), min_features=16)
    kinds = {n: type(mod) for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert kinds["lm_head"] is nn.Linear and kinds["small"] is nn.Linear  # glob, size
    for n in ("blocks.0.attn", "blocks.1.mlp.0", "blocks.1.mlp.2"):
        assert kinds[n] is Linear
    assert all(p is params[n] for n, p in m.named_parameters())  # same tensors
    text = repr(m)
    assert "recipe=nvfp4" in text and "backend=emulated" in text
    m(torch.randint(0, 16, (2, 32))).sum().backward()

    lptrain.unconvert(m)
    assert all(type(mod) is nn.Linear for mod in m.modules() if isinstance(mod, nn.Linear))
    assert all(p is params[n] for n, p in m.named_parameters())
    assert set(m.state_dict()) == set(Nested().state_dict())


def test_convert_skip_by_full_dotted_glob():
    m = lptrain.convert(Nested(), "fp8-current", skip=("blocks.*.mlp.*",))
    assert type(m.blocks[0]["mlp"][0]) is nn.Linear and type(m.blocks[0]["attn"]) is Linear


def test_unquantized_recipes_leave_the_model_alone():
    m = Nested()
    assert lptrain.convert(m, "fp32") is m
    assert not any(isinstance(mod, Linear) for mod in m.modules())


@pytest.mark.parametrize("name", ["fp8-delayed", "fp4-ue5m3-refresh"])
def test_amax_reduce_reaches_every_stateful_operand(name: str):
    """Multi-rank exact resume needs every recorded amax MAX-reduced across ranks: a reduce
    that returns a constant must be what every state of every converted layer recorded."""
    recipe = (
        recipes.from_dict({"base": "fp4-ue5m3", "output": {"input": {"amax_refresh": 4}}})
        if name == "fp4-ue5m3-refresh"
        else name
    )
    m = _build(recipe)
    calls = []

    def reduce(amax: torch.Tensor) -> torch.Tensor:
        calls.append(amax)
        return torch.full_like(amax, 1000.0)

    lptrain.nn.set_amax_reduce(m, reduce)
    m(torch.randint(0, 16, (4, 8))).square().mean().backward()
    states = {
        (layer_name, key): st
        for layer_name, layer in m.named_modules()
        if isinstance(layer, Linear) and layer.quant_state is not None
        for key, st in layer.quant_state.items()
    }
    assert states and len(calls) >= len(states)
    for where, st in states.items():
        assert int(st.calls) > 0, f"{where}: state never used"
        recorded = torch.cat([st.amax_history[st.amax_history > 0], st.ref.reshape(1)])
        recorded = recorded[recorded > 0]
        assert recorded.numel() > 0 and (recorded == 1000.0).all(), f"{where}: {recorded}"


def test_second_convert_re_recipes_and_summary_says_so(caplog):
    m = lptrain.convert(Nested(), "fp8-delayed", skip=("lm_head",))
    old = m.blocks[0]["attn"]
    with caplog.at_level("INFO", logger="lptrain"):
        lptrain.convert(m, "nvfp4", skip=("lm_head", "small"), min_features=16)
    new = m.blocks[0]["attn"]
    assert (
        new.recipe.name == "nvfp4" and new.weight is old.weight and int(new.seed) == int(old.seed)
    )
    assert new.quant_state is None  # fresh state for the new recipe (nvfp4 keeps no history)
    text = caplog.text
    assert "convert: 6 layers to nvfp4" in text and "re-recipe'd from fp8-delayed" in text
    assert "lm_head (skip 'lm_head')" in text and "small (skip 'small')" in text


def test_skip_pattern_matching_nothing_is_reported():
    with pytest.warns(UserWarning, match=r"skip patterns matched no layer: \['lm_haed'\]"):
        lptrain.convert(Nested(), "fp8-current", skip=("lm_haed",))


def test_min_features_reason_in_summary(caplog):
    with caplog.at_level("INFO", logger="lptrain"):
        lptrain.convert(Nested(), "fp8-current", min_features=16)
    assert "small (min_features 16 > 8)" in caplog.text


def _gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=97, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_layers_are_converted_and_unconverted():
    from transformers.pytorch_utils import Conv1D as HFConv1D

    ref = _gpt2()
    m = lptrain.convert(_gpt2(), "fp8-current")
    convs = [n for n, mod in m.named_modules() if isinstance(mod, lpnn.Conv1D)]
    assert len(convs) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    want, got = ref(idx).logits, m(idx).logits
    assert 15 < sqnr_db(got, want) < 60  # FP8-quantized, not garbage and not pass-through
    m.train()
    m(idx, labels=idx).loss.backward()
    assert m.transformer.h[0].attn.c_attn.weight.grad.shape == (64, 192)  # Conv1D layout
    lptrain.unconvert(m)
    assert all(
        type(mod) is HFConv1D for n, mod in m.named_modules() if n.endswith(("c_attn", "c_fc"))
    )
    assert torch.equal(m.eval()(idx).logits, want)


def test_converted_hf_model_saves_and_loads_with_save_pretrained(tmp_path):
    """Quantizer state is tensors only: save_pretrained (safetensors) works and a reload continues
    with the same next loss (issue 9)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
    )  # fmt: skip
    model = lptrain.convert(transformers.LlamaForCausalLM(cfg), "fp8-delayed", skip=("lm_head",))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 97, (2, 16), generator=g) for _ in range(4)]
    for b in batches[:3]:
        opt.zero_grad()
        model(b, labels=b).loss.backward()
        opt.step()
    model.save_pretrained(tmp_path)  # safetensors by default
    want = model(batches[3], labels=batches[3]).loss

    fresh = lptrain.convert(transformers.LlamaForCausalLM(cfg), "fp8-delayed", skip=("lm_head",))
    state = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.endswith("quant_state.output_input.amax_history") for k in state)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # tied to the embeddings
    assert torch.equal(fresh(batches[3], labels=batches[3]).loss, want)
