"""The converter chain (train/converters.py): fixed order, validated sections, hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.train import converters
from lptrain.train.config import ConfigError, parse


def _cfg(**precision):
    dtype = "bf16" if precision.get("recipe") == "bf16" else "fp32"  # bf16 needs its dtype
    return parse({"run": {"max_steps": 1}, "precision": precision, "deepspeed": {"dtype": dtype}})


def test_high_precision_recipes_convert_nothing():
    assert converters.build(_cfg(recipe="fp32")) == []
    assert converters.build(_cfg(recipe="bf16")) == []
    assert converters.recipe_dict(_cfg(recipe="fp32")) is None


def test_precision_converter_swaps_seeds_and_logs():
    (conv,) = converters.build(_cfg(recipe="nvfp4", skip=["head"]))
    assert conv.name == "precision" and converters.ORDER[0] == "precision"
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

        def wrap_step(self, fn):
            def step(s, p):
                calls.append("wrapped")
                return fn(s, p)

            return step

    fn = converters.wrap_step(lambda s, p: "base", [Hooked()])
    assert fn(None, None) == "base" and calls == ["wrapped"]
    converters.after_step(None, [Hooked()], 3)
    assert calls[-1] == ("after", 3)


def test_bad_inline_recipe_names_the_path():
    with pytest.raises(ConfigError, match=r"^precision.recipe: output.input.format"):
        converters.build(_cfg(recipe={"base": "fp8-current", "output": {"input": {"format": "x"}}}))
