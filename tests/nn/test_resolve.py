"""Named recipes, the dict/YAML form and name lookup (nn/catalog.py, nn/resolve.py)."""

from __future__ import annotations

import pytest
from torch import nn

import lptrain
from lptrain import recipes
from lptrain.nn import RecipeError


def test_recipe_from_dict_base_plus_overrides_and_round_trip():
    r = recipes.from_dict(
        {
            "base": "nvfp4",
            "grad_weight": {"grad_output": {"rounding": "nearest"}},
            "trust_mask": False,
        }
    )
    base = recipes.get("nvfp4")
    assert r.grad_weight.a.rounding == "nearest"
    assert r.grad_weight.a.hadamard == 16  # other fields kept
    assert r.output == base.output and r.grad_input == base.grad_input
    again = recipes.from_dict(r.to_dict())
    assert again == r
    for name in recipes.names():
        assert recipes.from_dict(recipes.get(name).to_dict()) == recipes.get(name)


def test_recipe_yaml(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text("base: fp8-current\nname: mine\noutput:\n  input:\n    format: fp8_e5m2\n")
    m = lptrain.convert(nn.Sequential(nn.Linear(32, 32)), str(p))
    assert m[0].recipe.name == "mine" and m[0].recipe.output.a.format == "fp8_e5m2"


@pytest.mark.parametrize(
    "d, path",
    [
        (
            {"base": "fp8-current", "grad_input": {"grad_output": {"format": "fp9"}}},
            r"^grad_input\.grad_output\.format",
        ),
        (
            {"base": "fp8-current", "grad_input": {"grad_output": {"formatt": "fp8_e5m2"}}},
            r"^grad_input\.grad_output\.formatt: unknown QuantSpec field",
        ),
        (
            {"base": "fp8-current", "grad_weight": {"bias": None}},
            r"^grad_weight\.bias: unknown key",
        ),
        ({"base": "fp8-current", "colour": 1}, r"^colour: unknown recipe key"),
        ({"base": "fp8-current", "output": {"chunk": "8"}}, r"^output\.chunk: expected an int"),
        ({"base": "fp8-current", "trust_mask": "yes"}, r"^trust_mask: expected bool"),
    ],
)
def test_recipe_errors_name_the_field_path(d, path):
    with pytest.raises(RecipeError, match=path):
        recipes.from_dict(d)


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown recipe 'fp7'.*fp8-current.*nvfp4"):
        recipes.get("fp7")
    with pytest.raises(RecipeError, match=r"^base: unknown recipe 'fp7'"):
        recipes.from_dict({"base": "fp7"})
    with pytest.raises(ValueError, match="known recipes"):
        lptrain.convert(nn.Sequential(nn.Linear(8, 8)), "fp7")


@pytest.mark.parametrize(
    "d, message",
    [
        (
            {"base": "fp8-delayed", "output": {"input": {"history_len": "16"}}},
            "output.input.history_len: expected int, got str '16'",
        ),
        (
            {"base": "mxfp8", "output": {"input": {"scale_target": 448}}},
            "output.input.scale_target: applies to two-level scale formats ue4m3/ue5m3 only",
        ),
        (
            {"base": "fp8-current", "output": {"chunk": 8}},
            "output: chunk and overflow apply to accumulate='int32' only",
        ),
        (
            {"base": "int16-dfp", "grad_weight": {"overflow": "saturate"}},
            "grad_weight.overflow: 'saturate' is not one of ('recompute', 'wrap')",
        ),
    ],
)
def test_yaml_type_and_meaning_errors_name_the_field(d, message):
    with pytest.raises(RecipeError) as e:
        recipes.from_dict(d)
    assert str(e.value).startswith(message), str(e.value)


# ---------------------------------------------------------------- Recipe.take (one GEMM / operand)


def test_take_replaces_one_gemm_or_operand_and_says_so_in_the_name():
    nvfp4, bf16, fp8 = recipes.get("nvfp4"), recipes.get("bf16"), recipes.get("fp8-current")
    r = nvfp4.take(bf16, "grad_weight")
    assert r.name == "nvfp4[grad_weight=bf16]" and not r.grad_weight.quantized
    assert (r.output, r.grad_input, r.signs) == (nvfp4.output, nvfp4.grad_input, nvfp4.signs)
    r = r.take(fp8, "grad_weight").take(bf16, "output", "input")  # a later take of a GEMM wins
    assert r.name == "nvfp4[grad_weight=fp8-current, output.input=bf16]"
    assert r.grad_weight == fp8.grad_weight
    assert r.output.a is None and r.output.b == nvfp4.output.b
    assert r.take(fp8, "output").name == "nvfp4[grad_weight=fp8-current, output=fp8-current]"
    assert recipes.from_dict(r.to_dict()) == r  # the dict form (checkpoints, guard state)
    assert nvfp4.take(nvfp4, "output").runs_like(nvfp4)  # the same numerics, another name
    assert not r.runs_like(nvfp4)


def test_take_carries_the_options_that_belong_to_the_gemm():
    fp8 = recipes.get("fp8-current")
    hp = fp8.replace(grad_weight=recipes.GemmRecipe(), wgrad_high_precision=True)
    assert not hp.take(fp8, "grad_weight").wgrad_high_precision  # quantized again: valid
    quest = recipes.get("quartet").replace(backward_operands="requantize", trust_mask=True)
    assert not quest.take(recipes.get("bf16"), "output").trust_mask  # nothing clips any more
    assert quest.take(fp8, "output").trust_mask


def test_take_refuses_what_is_no_valid_recipe():
    nvfp4 = recipes.get("nvfp4")
    with pytest.raises(RecipeError, match=r"^grad_weight: hadamard differs"):
        nvfp4.take(recipes.get("bf16"), "grad_weight", "input")  # one operand rotated
    with pytest.raises(RecipeError, match=r"^grad_weight: has operands 'grad_output' and 'input'"):
        nvfp4.take(recipes.get("bf16"), "grad_weight", "weight")
