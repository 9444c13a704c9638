"""LoRALinear and lora.apply (lptrain/lora/layer.py, apply.py): peft conventions, gradients of
A and B vs float64 autograd, frozen base, merge/unmerge, lptrain.nn.Linear bases, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lptrain
import lptrain.lora as lora
import lptrain.nn as lpnn
from lptrain.lora import AdapterConfig, AdapterConfigError, LoRALinear
from lptrain.qat import QuantizedLinear


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))


def test_peft_conventions():
    m = LoRALinear(nn.Linear(64, 32), r=4, alpha=8, dropout=0.1)
    assert m.scaling == 2.0 and torch.all(m.lora_B == 0) and m.lora_A.shape == (4, 64)
    assert not any(p.requires_grad for p in m.base_layer.parameters())
    x = torch.randn(3, 64)
    m.eval()
    assert torch.equal(m(x), m.base_layer(x))  # B = 0: the base model at init


@pytest.mark.parametrize("base", ["none", "bf16", "fp8", "int8", "int4", "nvfp4", "nf4"])
def test_grads_of_a_b_x_equal_float64_autograd(base):
    torch.manual_seed(1)
    lin = nn.Linear(64, 32).double()
    m = LoRALinear(lin, r=4, alpha=8, base_format=base, group_size=32).double()
    if isinstance(m.base_layer, QuantizedLinear):
        m.base_layer.bias = m.base_layer.bias.double()
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(2, 5, 64, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, 32, dtype=torch.float64)
    got = torch.autograd.grad(m(x), (x, m.lora_A, m.lora_B), dy)
    w = m.base_layer.dequantize().double() if base != "none" else lin.weight
    A, B = m.lora_A.detach().requires_grad_(), m.lora_B.detach().requires_grad_()
    ref = nn.functional.linear(x, w.detach(), lin.bias.detach()) + (x @ A.T @ B.T) * 2.0
    want = torch.autograd.grad(ref, (x, A, B), dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_apply_freezes_everything_but_adapters_and_base_never_gets_grad():
    model = _model()
    lora.apply(model, AdapterConfig(r=4, base="int4", skip=[]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    model(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lora.base_bytes_per_param(model) <= 0.6


def test_merge_unmerge_float_base():
    """merge writes W0 + (alpha/r)·B·A into the base (float64 reference) and turns the adapter
    path off; unmerge restores W0. A merge that did nothing fails the weight check."""
    model = _model()
    lora.apply(model, AdapterConfig(r=4, alpha=8, skip=[]))
    layers = dict(lora.adapter_layers(model))
    for m in layers.values():
        nn.init.normal_(m.lora_B, std=0.1)
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    x = torch.randn(4, 64)
    y = model(x)
    lora.merge(model)
    for n, m in layers.items():
        want = w0[n].double() + 2.0 * (m.lora_B.double() @ m.lora_A.double())
        assert m.merged
        torch.testing.assert_close(m.base_layer.weight.double(), want, rtol=0, atol=1e-6)
        assert (m.base_layer.weight - w0[n]).abs().max() > 1e-3  # the delta is not negligible
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
    lora.unmerge(model)
    for n, m in layers.items():
        assert not m.merged
        torch.testing.assert_close(m.base_layer.weight, w0[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_leaves_plain_layers_computing_the_adapted_model():
    model = _model()
    lora.apply(model, AdapterConfig(r=4, skip=[]))
    for _, m in lora.adapter_layers(model):
        nn.init.normal_(m.lora_B, std=0.1)
    x = torch.randn(4, 64)
    y = model(x)
    assert lora.merge_and_unload(model) is model
    assert not list(lora.adapter_layers(model))
    assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear]
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["int4", "nf4"])
def test_merge_quantized_base_requantizes(base):
    m = LoRALinear(nn.Linear(64, 32), r=4, base_format=base, group_size=32)
    nn.init.normal_(m.lora_B, std=0.05)
    want = QuantizedLinear.from_weight(
        m.base_layer.dequantize() + m.delta_weight().detach(), base, group_size=32
    ).dequantize()
    assert torch.equal(lora.merged_layer(m).dequantize(), want)  # what the export folds
    m.merge()
    assert m.merged and m.base_layer.fmt == base and m.base_layer.group_size == 32
    assert torch.equal(m.base_layer.dequantize(), want)
    with pytest.warns(UserWarning, match="re-quantizes"):
        m.unmerge()


@pytest.mark.parametrize("recipe", [None, "bf16", "fp8-current"])
def test_merge_into_a_conv1d_base(recipe):
    """GPT-2's Conv1D stores W as (in, out), transformers' own and lptrain's (a recipe): the
    merge adds (alpha/r)·B·A in that layout (a (64, 192) layer; lptrain's crashed here)."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(pytorch_utils.Conv1D(192, 64))
    if recipe is not None:
        lptrain.convert(model, recipe, skip=[])
    w0 = model[0].weight.detach().clone()  # (in, out)
    lora.apply(model, AdapterConfig(r=4, alpha=8, skip=[]))
    nn.init.normal_(model[0].lora_B, std=0.1)
    want = w0.double() + 2.0 * (model[0].lora_B.double() @ model[0].lora_A.double()).T
    lora.merge(model)
    torch.testing.assert_close(model[0].base_layer.weight.double(), want, rtol=0, atol=1e-6)


def test_lptrain_linear_base_keeps_its_recipe():
    model = _model()
    lptrain.convert(model, "fp8-current")
    lora.apply(model, AdapterConfig(r=4, base="fp8", skip=[]))
    layer = model[0]
    assert isinstance(layer.base_layer.recipe_layer, lpnn.Linear)
    assert layer.base_layer.recipe_layer.weight is None  # only the fp8 codes are stored
    x = torch.randn(4, 64, requires_grad=True)
    model(x).sum().backward()
    assert int(layer.base_layer.recipe_layer.step) == 1 and x.grad is not None
    assert layer.lora_A.grad is not None


def test_bad_input_names_the_field():
    with pytest.raises(AdapterConfigError, match="^base: 'int3' is not one of"):
        AdapterConfig(base="int3")
    with pytest.raises(AdapterConfigError, match="^bits: must be in 2..8, got 9"):
        AdapterConfig(type="l4q", bits=9)
    with pytest.raises(AdapterConfigError, match="^base: l4q quantizes"):
        AdapterConfig(type="l4q", base="int4")
    with pytest.raises(AdapterConfigError, match="^group_size: 48 does not divide in_features 64"):
        lora.apply(_model(), AdapterConfig(type="l4q", group_size=48, skip=[]))
    with pytest.raises(AdapterConfigError, match="^targets: .* matches no linear layer"):
        lora.apply(_model(), AdapterConfig(targets=["nothing"]))


@pytest.mark.parametrize("kind", ["lora", "l4q"])
def test_a_rank_beyond_the_layer_is_refused_before_any_allocation(kind):
    """B·A has rank <= min(in, out): r above it is refused by name (r=1e9 ran out of memory);
    r = min(in, out) still builds."""
    cfg = AdapterConfig(type=kind, r=10**9, group_size=32, skip=[])
    with pytest.raises(AdapterConfigError, match=r"^r: 1000000000 exceeds min\(in_features, "
                       r"out_features\) = 64: .* \(layer 0\)$"):  # fmt: skip
        lora.apply(_model(), cfg)
    with pytest.raises(AdapterConfigError, match=r"^r: 33 exceeds .* = 32: .* \(layer 2\)$"):
        lora.apply(_model(), AdapterConfig(type=kind, r=33, group_size=32, skip=[]))
    assert lora.apply(_model(), AdapterConfig(type=kind, r=32, group_size=32, skip=[]))


@pytest.mark.parametrize("alpha", [0.0, -8.0, float("nan")])
def test_an_alpha_that_fine_tunes_nothing_is_refused(alpha):
    with pytest.raises(AdapterConfigError, match=rf"^alpha: must be > 0, got {alpha}: "):
        AdapterConfig(alpha=alpha)
