"""peft interop (lptrain/lora/peft_io.py): a peft LoRA model on lptrain-converted layers trains;
lptrain LoRA adapters load into peft and peft's load into lptrain, same outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import lptrain
import lptrain.lora as lora
from lptrain.config.schema import ModelConfig
from lptrain.models.decoder import build_model

peft = pytest.importorskip("peft")
TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def _decoder():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="nano"), vocab_size=257, max_seq_len=32)


def _tokens(seed=0):
    return torch.randint(1, 257, (4, 33), generator=torch.Generator().manual_seed(seed))


def test_peft_lora_on_lptrain_converted_layers_trains():
    model = lptrain.convert(_decoder(), "fp8-current", skip=["lm_head"])
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    base_layer = pm.base_model.model.layers[0].attn.wq.base_layer
    assert isinstance(base_layer, lptrain.nn.Linear)
    frozen = base_layer.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    batch = _tokens()
    losses = []
    for _ in range(8):
        loss = pm(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert torch.equal(base_layer.weight, frozen) and int(base_layer.step) == 8


def _lptrain_lora_model():
    model = lora.apply(_decoder(), lora.AdapterConfig(r=4, alpha=8, targets=TARGETS))
    g = torch.Generator().manual_seed(3)
    for _, m in lora.adapter_layers(model):
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model.eval()


def test_lptrain_adapter_loads_into_peft(tmp_path):
    ours = _lptrain_lora_model()
    lora.save_peft(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(_decoder(), str(tmp_path / "adapter")).eval()
    batch = _tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(theirs(batch), ours(batch), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(_decoder()(batch), ours(batch))  # the adapter matters


def test_peft_adapter_loads_into_lptrain(tmp_path):
    pm = peft.get_peft_model(_decoder(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.05)
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = lora.apply(_decoder(), lora.AdapterConfig(r=4, alpha=8, targets=TARGETS))
    lora.load_peft(ours, tmp_path / "peft")
    batch = _tokens(2)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(batch), pm.eval()(batch), rtol=1e-6, atol=1e-6)


def test_mismatched_adapter_is_refused(tmp_path):
    lora.save_peft(_lptrain_lora_model(), tmp_path / "a")
    other = lora.apply(_decoder(), lora.AdapterConfig(r=8, alpha=8, targets=TARGETS))
    with pytest.raises(ValueError, match="adapter has r=4"):
        lora.load_peft(copy.deepcopy(other), tmp_path / "a")


def _hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_save_peft_of_the_hugging_face_model_lptrain_returns_loads_in_peft(tmp_path):
    """lptrain wraps a Hugging Face model (models/hf.py, names `model.<HF path>`); the adapter
    is saved by the HF model's own paths, so peft loads it onto the plain model (it raised
    NoMatchingPeftModuleError), and gives lptrain's logits bit for bit."""
    from lptrain.models.hf import HFCausalLM

    plain = _hf_llama()
    ours = HFCausalLM(copy.deepcopy(plain))
    lora.apply(ours, lora.AdapterConfig(r=4, alpha=8, targets=HF_TARGETS))
    g = torch.Generator().manual_seed(3)
    for _, m in lora.adapter_layers(ours):
        with torch.no_grad():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    lora.save_peft(ours.eval(), tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    ids = _tokens(4)[:, :32]
    with torch.no_grad():
        want = ours.model(input_ids=ids).logits
        got = theirs(input_ids=ids).logits
        assert torch.equal(got, want)
        assert not torch.allclose(_hf_llama()(input_ids=ids).logits, want)  # the adapter matters
    # ... and back: lptrain's wrapper reads what peft wrote by those paths.
    theirs.save_pretrained(str(tmp_path / "from-peft"))
    back = HFCausalLM(_hf_llama())
    lora.apply(back, lora.AdapterConfig(r=4, alpha=8, targets=HF_TARGETS))
    lora.load_peft(back, tmp_path / "from-peft")
    with torch.no_grad():
        assert torch.equal(back.eval().model(input_ids=ids).logits, want)


def test_the_adapter_records_its_base_and_another_base_warns(tmp_path):
    """lptrain_base.json beside peft's files: peft's own config stays as peft writes it (no
    unknown key to warn about); loading onto a base stored otherwise warns with both."""
    import json
    import warnings

    int4 = lora.AdapterConfig(r=4, alpha=8, targets=TARGETS, base="int4", base_group_size=32)
    lora.save_peft(lora.apply(_decoder(), int4), tmp_path / "a")
    record = json.loads((tmp_path / "a" / "lptrain_base.json").read_text())
    assert record == {"base_storage": {"format": "int4", "group_size": 32}}
    assert "lptrain_base" not in (tmp_path / "a" / "adapter_config.json").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft reads the directory without a word
        peft.PeftConfig.from_pretrained(str(tmp_path / "a"))
        lora.load_peft(lora.apply(_decoder(), int4), tmp_path / "a")
    float_base = lora.apply(_decoder(), lora.AdapterConfig(r=4, alpha=8, targets=TARGETS))
    with pytest.warns(UserWarning, match=r"trained on a base stored as int4, group 32; this "
                      r"model's base is stored as none \(the float weights\)"):  # fmt: skip
        lora.load_peft(float_base, tmp_path / "a")
