"""The converter chain (models/converters.py): fixed order, validated sections, hooks."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain import recipes
from lptrain.config.precision import recipe_dict
from lptrain.config.schema import ConfigError, parse
from lptrain.models import converters


def _cfg(**precision):
    dtype = "bf16" if precision.get("recipe") == "bf16" else "fp32"  # bf16 needs its dtype
    return parse({"run": {"max_steps": 1}, "precision": precision, "deepspeed": {"dtype": dtype}})


def test_high_precision_recipes_convert_nothing():
    assert converters.build(_cfg(recipe="fp32")) == []
    assert converters.build(_cfg(recipe="bf16")) == []
    assert recipe_dict(_cfg(recipe="fp32")) is None


@pytest.mark.parametrize("recipe", ["bf16", "fp8-current"])
def test_saved_activations_convert_the_decoder_ops_for_any_recipe(recipe):
    from lptrain.config.schema import ModelConfig
    from lptrain.models.decoder import build_model

    (conv,) = converters.build(_cfg(recipe=recipe, saved_activations="fp8"))
    said = []
    ctx = converters.ConvertContext(0, 0, 1, said.append)
    model = converters.apply(build_model(ModelConfig(preset="nano"), 256, 16), [conv], ctx)
    assert model.norm.saved == model.layers[1].attn.saved == "fp8"
    assert said[-1] == "precision.saved_activations: 9 RMSNorm/SwiGLU/attention ops keep fp8"
    with pytest.raises(ConfigError, match="^precision.saved_activations: Sequential has no"):
        converters.apply(nn.Sequential(nn.Linear(32, 32)), [conv], ctx)  # e.g. a Hugging Face model


def test_precision_converter_swaps_seeds_and_logs():
    (conv,) = converters.build(_cfg(recipe="nvfp4", skip=["head"]))
    assert conv.name == "precision"
    assert converters.ORDER == ("init", "precision", "qat", "bitswitch", "adapters")
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(32, 32))
    model.add_module("head", nn.Linear(32, 8))
    said = []
    model = converters.apply(model, [conv], converters.ConvertContext(7, 1, 1, said.append))
    assert isinstance(model.body, lpnn.Linear) and type(model.head) is nn.Linear
    assert said and "convert: 1 layers to nvfp4" in said[0] and "head (skip 'head')" in said[0]
    with pytest.warns(UserWarning, match=r"skip patterns matched no layer: \['head'\]"):
        other = converters.apply(
            nn.Sequential(nn.Linear(32, 32)),
            [conv],
            converters.ConvertContext(7, 0, 1, said.append),
        )
    assert int(other[0].seed) != int(model.body.seed)  # per-rank streams


def test_hooks_run_in_order():
    calls = []

    class Hooked:
        name = "hooked"

        def convert(self, model, ctx):
            return model

        def after_step(self, model, step):
            calls.append(("after", step))

    converters.after_step(None, [Hooked()], 3)
    assert calls[-1] == ("after", 3)


def test_bad_inline_recipe_names_the_path():
    with pytest.raises(ConfigError, match=r"^precision.recipe: output.input.format"):
        converters.build(_cfg(recipe={"base": "fp8-current", "output": {"input": {"format": "x"}}}))


def test_precision_converter_lets_backends_cache_weights_until_each_optimizer_step(monkeypatch):
    class Caching:  # a backend that keeps quantized weights (as the triton backend does)
        name = "caching"
        cache_weights = False
        cleared = 0

        def supports(self, recipe):
            return None

        def after_step(self):
            self.cleared += 1

    backend = Caching()
    module = sys.modules["lptrain.nn.convert"]  # the package re-exports a function of that name
    monkeypatch.setattr(module, "resolve_backend", lambda *a, **k: (backend, "test"))
    (conv,) = converters.build(_cfg(recipe="fp8-current", skip=[]))
    ctx = converters.ConvertContext(0, 0, 1, lambda s: None)
    model = converters.apply(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)), [conv], ctx)
    assert model[0].backend is model[1].backend is backend and backend.cache_weights
    converters.after_step(model, [conv], 1)
    assert backend.cleared == 1  # once per model, not per layer


def test_finetune_converters_follow_the_order_and_name_keys():
    cfg = parse({"run": {"max_steps": 1}, "precision": {"recipe": "fp8-current"},
                 "qat": {"method": "lsq+", "act_bits": 8, "weight_granularity": "group",
                         "group_size": 16}})  # fmt: skip
    convs = converters.build(cfg)
    assert [c.name for c in convs] == ["precision", "qat"]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    said = []
    batch = torch.randn(4, 32)
    ctx = converters.ConvertContext(0, 0, 1, said.append, sample=lambda: batch)
    model = converters.apply(model, convs, ctx)
    assert isinstance(model[0].base, lpnn.Linear) and bool(model[0].input_quantizer.initialized)
    assert said[-1].startswith("qat: 2 layers, lsq+ weights 4 bits (group 16), inputs 8 bits")
    bad = parse({"run": {"max_steps": 1}, "qat": {"method": "lsq", "weight_granularity": "group",
                                                  "group_size": 24}})  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"^qat.group_size: 24 does not divide in_features 32 of a \(8, 32\) weight",
    ):
        converters.apply(nn.Sequential(nn.Linear(32, 8)), converters.build(bad), ctx)


# ---------------------------------------------------------------- precision.overrides


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Module()
    for name in ("wq", "w1", "lm_head"):
        net.add_module(name, nn.Linear(32, 32))
    return net


def _convert(recipe="nvfp4", *overrides, **precision):
    said = []
    (conv,) = converters.build(_cfg(recipe=recipe, overrides=list(overrides), **precision))
    net = converters.apply(_net(), [conv], converters.ConvertContext(0, 0, 1, said.append))
    return net, said


def test_overrides_change_one_gemm_or_operand_of_the_layers_they_match():
    wgrad = {"layers": ["w1"], "gemm": "grad_weight", "recipe": "bf16"}
    weight = {"gemm": "*", "operand": "weight", "recipe": {"base": "fp8-current"}}
    net, said = _convert("mxfp8", wgrad, weight)
    mx, fp8 = recipes.get("mxfp8"), recipes.get("fp8-current")
    both = "output.weight=fp8-current+custom, grad_input.weight=fp8-current+custom"
    assert net.w1.recipe.name == f"mxfp8[grad_weight=bf16, {both}]"
    assert net.wq.recipe.name == f"mxfp8[{both}]"
    assert not net.w1.recipe.grad_weight.quantized and net.wq.recipe.grad_weight == mx.grad_weight
    for layer in (net.w1, net.wq):  # "*" with an operand: every GEMM that has it
        assert layer.recipe.output.a == mx.output.a and layer.recipe.output.b == fp8.output.b
        assert layer.recipe.grad_input.b == fp8.grad_input.b
    assert type(net.lm_head) is nn.Linear  # precision.skip: not converted, not overridden
    assert int(net.w1.seed) == int(_convert("mxfp8")[0].w1.seed)  # the layer's own stream
    assert said[-1] == (
        f"precision.overrides: 1 layer(s) on mxfp8[{both}], "
        f"1 layer(s) on mxfp8[grad_weight=bf16, {both}]"
    )


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"gemm": "wgrad", "recipe": "bf16"}, r"\[0\]\.gemm: 'wgrad' is not a GEMM; they are "),
        ({"operand": "x", "recipe": "bf16"}, r"\[0\]\.operand: 'x' is not an operand; they are "),
        ({"gemm": ["output", "grad_weight"], "operand": "weight", "recipe": "bf16"},
         r"\[0\]\.operand: grad_weight has operands grad_output and input, not weight"),
        ({"gemm": "output"}, r"\[0\]\.recipe: required"),
        ({"gemm": "output", "recipe": "fp9"}, r"\[0\]\.recipe: unknown recipe 'fp9'"),
        ({"layers": ["attn.*"], "recipe": "bf16"},
         r"\[0\]\.layers: \['attn\.\*'\] match no lptrain layer; the model has wq, w1$"),
        ({"layers": ["lm_head"], "recipe": "bf16"}, r"\[0\]\.layers: \['lm_head'\] match no "),
        ({"gemm": "output", "recipe": "nvfp4"},
         r"\[0\]\.recipe: changes nothing: every layer it matches already runs output as nvfp4"),
        ({"gemm": "grad_weight", "operand": "input", "recipe": "bf16"},
         r"\[0\]\.operand: grad_weight\.input of bf16 in nvfp4 is no valid recipe \(grad_weight: "
         r"hadamard differs between grad_output \(16\) and input \(None\)"),
    ],
)  # fmt: skip
def test_an_override_that_cannot_act_or_changes_nothing_is_refused_by_key(entry, message):
    with pytest.raises(ConfigError, match=r"^precision\.overrides" + message):
        _convert("nvfp4", entry)


def test_overrides_without_converted_layers_or_lptrain_gemms_are_refused():
    entry = {"gemm": "output", "recipe": "fp8-current"}
    with pytest.raises(ConfigError, match=r"^precision\.overrides: precision\.recipe fp32 conv"):
        converters.build(_cfg(recipe="fp32", overrides=[entry]))
    with pytest.raises(ConfigError, match=r"^precision\.overrides: precision\.recipe fp32 conv"):
        converters.build(_cfg(recipe="fp32", overrides=[entry], saved_activations="fp8"))
    with pytest.raises(ConfigError, match=r"^precision\.overrides: backend 'te' runs Transfor"):
        converters.build(_cfg(recipe="nvfp4", backend="te", overrides=[entry]))
    with pytest.warns(UserWarning, match=r"^precision\.overrides\[0\]\.layers: \['x'\] match no "):
        _convert("nvfp4", {**entry, "layers": ["wq", "x"]})  # the rest of the list acts


def test_the_second_override_is_judged_on_what_the_first_left():
    first = {"gemm": "grad_weight", "recipe": "bf16"}
    with pytest.raises(ConfigError, match=r"^precision\.overrides\[1\]\.recipe: changes nothing"):
        _convert("nvfp4", first, first)
    net, _ = _convert("nvfp4", first, {**first, "layers": ["w1"], "recipe": "fp8-current"})
    assert net.w1.recipe.name == "nvfp4[grad_weight=fp8-current]"
    assert net.wq.recipe.name == "nvfp4[grad_weight=bf16]"
