"""backend: te (nn/backends/te_mapping.py): the recipe -> TE recipe mapping, as data,
without TransformerEngine: the named recipes with a TE equivalent map with every field
explicit, variants map their fields, recipes without an equivalent are refused with the field
that differs; the mapping builds the TE objects it describes (checked on a stand-in module)."""

from __future__ import annotations

import sys
import types

import pytest

from lptrain import recipes
from lptrain.nn.backends.te_mapping import TEMapping, TEUnsupported, te_mapping


def _custom(base: str, **fields):
    return recipes.from_dict({"base": base, **fields})


def _te_delayed():
    """fp8-delayed as TE runs it: scale 1 until the history holds an amax."""
    one = {"delayed_init": "one"}
    return _custom("fp8-delayed", **{g: {o: one for o in ops} for g, ops in (
        ("output", ("input", "weight")), ("grad_input", ("grad_output", "weight")),
        ("grad_weight", ("grad_output", "input")))})  # fmt: skip


def test_named_recipes_with_a_te_equivalent():
    with pytest.raises(TEUnsupported, match=r"delayed_init: TE has 'one', the recipe 'current'"):
        te_mapping(recipes.get("fp8-delayed"))  # lptrain starts with current scaling; TE cannot
    m = te_mapping(_te_delayed())
    assert m.cls == "DelayedScaling"
    assert m.kwargs == dict(
        fp8_format="HYBRID",
        margin=0,
        amax_history_len=1024,
        amax_compute_algo="max",
        reduce_amax=True,
        backward_override=None,
    )
    m = te_mapping(recipes.get("fp8-current"))
    assert (m.cls, m.kwargs["fp8_format"]) == ("Float8CurrentScaling", "HYBRID")
    assert m.attrs["fp8_quant_bwd_grad"] == dict(power_2_scale=False, amax_epsilon=0.0)
    m = te_mapping(recipes.get("fp8-block"))
    assert m.cls == "Float8BlockScaling" and m.kwargs["w_block_scaling_dim"] == 2
    assert m.kwargs["fp8_format"] == "E4M3" and m.attrs["fp8_quant_fwd_inp"]["power_2_scale"]
    m = te_mapping(recipes.get("nvfp4"))
    assert m.cls == "NVFP4BlockScaling"
    assert m.kwargs == dict(disable_rht=False, disable_stochastic_rounding=False,
                            disable_2d_quantization=False, row_scaled_activation=False,
                            nvfp4_4over6="none", backward_override=None)  # fmt: skip


def test_variants_map_their_fields():
    s = {"scaling": "delayed", "history_len": 16, "amax_algo": "most_recent", "margin": 1,
         "delayed_init": "one"}  # fmt: skip
    r = _custom("fp8-delayed", **{
        "output": {"input": s, "weight": s},
        "grad_input": {"grad_output": {**s, "format": "fp8_e4m3"}, "weight": s},
        "grad_weight": {"grad_output": {**s, "format": "fp8_e4m3"}, "input": s},
    })  # fmt: skip
    m = te_mapping(r)
    assert m.kwargs["fp8_format"] == "E4M3" and m.kwargs["amax_history_len"] == 16
    assert m.kwargs["amax_compute_algo"] == "most_recent" and m.kwargs["margin"] == 1
    # MXFP8 with TE's scale rounding (up) maps; lptrain's OCP default (floor) does not
    ceil = {"scale_rounding": "ceil"}
    mx = _custom("mxfp8", **{g: {o: ceil for o in ops} for g, ops in (
        ("output", ("input", "weight")), ("grad_input", ("grad_output", "weight")),
        ("grad_weight", ("grad_output", "input")))})  # fmt: skip
    assert te_mapping(mx) == TEMapping(
        "MXFP8BlockScaling", dict(fp8_format="E4M3", backward_override=None)
    )
    with pytest.raises(TEUnsupported, match=r"scale_rounding: TE has 'ceil', the recipe 'floor'"):
        te_mapping(recipes.get("mxfp8"))
    no_rht = _custom("nvfp4", grad_weight={"grad_output": {"hadamard": None,
                     "hadamard_signs": False}, "input": {"hadamard": None, "hadamard_signs":
                     False}}, signs="fixed")  # fmt: skip
    assert te_mapping(no_rht).kwargs["disable_rht"] is True


@pytest.mark.parametrize("name,why", [
    ("fp8-rowwise", "fp8_e4m3 with row scaling"),
    ("mxfp6", "fp6_e2m3 with block scaling and e8m0 scales"),
    ("mxfp4", "fp4_e2m1 with block scaling and e8m0 scales"),
    ("quartet", "fp4_e2m1 with block scaling and e8m0 scales"),
    ("fp4-ue5m3", "ue5m3 scales"),
    ("int16-dfp", "int16 with tensor scaling"),
    ("mxint8", "int8 with block scaling"),
])  # fmt: skip
def test_recipes_without_an_equivalent_are_refused_with_the_reason(name: str, why: str):
    with pytest.raises(TEUnsupported, match=why):
        te_mapping(recipes.get(name))


def test_a_near_miss_names_the_field():
    r = _custom("fp8-current", wgrad_high_precision=True, grad_weight={"grad_output": None,
                "input": None})  # fmt: skip
    with pytest.raises(TEUnsupported, match=r"grad_weight.grad_output: TE quantizes"):
        te_mapping(r)


def test_build_makes_the_te_objects_it_describes(monkeypatch):
    made = []

    class Recipe:
        def __init__(self, **kw):
            made.append((type(self).__name__, kw))

    class Format:
        HYBRID, E4M3 = "Format.HYBRID", "Format.E4M3"

    mod = types.SimpleNamespace(
        Format=Format,
        QParams=lambda **kw: ("QParams", kw),
        Float8CurrentScaling=type("Float8CurrentScaling", (Recipe,), {}),
    )
    pkg = types.ModuleType("transformer_engine")
    common = types.ModuleType("transformer_engine.common")
    common.recipe = mod
    monkeypatch.setitem(sys.modules, "transformer_engine", pkg)
    monkeypatch.setitem(sys.modules, "transformer_engine.common", common)
    out = te_mapping(recipes.get("fp8-current")).build()
    assert made == [("Float8CurrentScaling", {"fp8_format": "Format.HYBRID",
                                              "backward_override": None})]  # fmt: skip
    assert out.fp8_quant_fwd_weight == ("QParams", {"power_2_scale": False, "amax_epsilon": 0.0})
