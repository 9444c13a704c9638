"""The hf export's layout and its self-checks (lptrain/export/to_hf.py) on a tiny GPT-2, whose
Conv1D layers store W as (in, out). End to end (every architecture x recipe, reloaded by
transformers): tests/finetune/test_matrix.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lptrain import lora
from lptrain.errors import ConfigError
from lptrain.export import fold, to_hf
from lptrain.models import hf
from tests.helpers import tiny_gpt2

pytest.importorskip("transformers")


@pytest.fixture
def folded(tmp_path):
    """A GPT-2 with LoRA on an int4 base, B made non-zero, folded: QuantizedLinear (out, in)
    layers where the Hugging Face class has Conv1D (in, out)."""
    model = hf.load(tiny_gpt2(tmp_path / "gpt2"))
    lora.apply(model, lora.AdapterConfig(type="lora", r=4, alpha=8, base="int4"))
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.normal_(std=0.02)
    fold(model)
    return model.eval()


TOKENS = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))


def test_conv1d_layers_get_their_layout_and_the_logits(folded, tmp_path):
    with torch.no_grad():
        want = folded(torch.cat([TOKENS, TOKENS[:, :1]], 1))  # the folded model's loss
        model, dropped = to_hf.plain_model(folded)
    attn = model.model.transformer.h[0].attn
    assert type(attn.c_attn).__name__ == "Conv1D" and attn.c_attn.weight.shape == (64, 192)
    assert dropped == []
    with torch.no_grad():
        got = model(torch.cat([TOKENS, TOKENS[:, :1]], 1))
    assert abs(float(got) - float(want)) <= 1e-5
    to_hf.save(model, _Opened(), tmp_path / "out")
    back = to_hf.verify(model, tmp_path / "out", TOKENS)
    assert type(back.model.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"


def test_a_precision_recipe_is_named_and_its_layers_keep_their_bias(tmp_path):
    """Under a precision recipe a quantized base keeps the bias in its recipe layer."""
    import lptrain

    model = hf.load(tiny_gpt2(tmp_path / "gpt2"))
    bias = model.model.transformer.h[0].attn.c_attn.bias.detach().clone()
    lptrain.convert(model, "fp8-current")
    lora.apply(model, lora.AdapterConfig(type="lora", r=4, alpha=8, base="int4"))
    fold(model)
    model, dropped = to_hf.plain_model(model)
    assert dropped == ["the precision recipe's quantized GEMMs: fp32 GEMMs"]
    assert torch.equal(model.model.transformer.h[0].attn.c_attn.bias, bias)


def test_a_layer_in_the_wrong_layout_is_refused(folded, monkeypatch):
    """What the export did before: (out, in) nn.Linear in every place, Conv1D or not."""

    def as_linear(q, slot, name):
        layer = nn.Linear(q.in_features, q.out_features)
        layer.weight.data, layer.bias.data = q.dequantize(), q.bias.clone()
        return layer

    monkeypatch.setattr(to_hf, "plain_layer", as_linear)
    with pytest.raises(ConfigError, match=r"c_attn.weight would be written as \(192, 64\), the "
                       r"Hugging Face class expects \(64, 192\)"):  # fmt: skip
        to_hf.plain_model(folded)


def test_a_square_layer_written_transposed_fails_the_reload_check(folded, tmp_path):
    """A square (64, 64) weight fits either layout: only the reloaded logits can tell."""
    model, _ = to_hf.plain_model(folded)
    to_hf.save(model, _Opened(), tmp_path / "out")
    proj = model.model.transformer.h[0].attn.c_proj
    proj.weight.data = proj.weight.data.t().contiguous()  # what the file would hold, wrongly
    with pytest.raises(ConfigError, match="reloaded by transformers, differs from the folded"):
        to_hf.verify(model, tmp_path / "out", TOKENS)


class _Opened:
    """What save() reads of an opened run: its tokenizer (the byte tokenizer writes none)."""

    class tok:
        name = "byte"


def test_eval_of_a_hugging_face_directory_is_one_line(tmp_path):
    from lptrain.export import restore

    with pytest.raises(ConfigError, match="is a Hugging Face model directory .* int exports"):
        restore.open_any(tiny_gpt2(tmp_path / "gpt2"))  # was: manifest.json lacks zero_stage
