"""One module-selection signature (lptrain/nn/select.py) and one default for the output head,
in every conversion: lptrain.convert, qat.prepare, qat.bitswitch.prepare, lora.apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lptrain
from lptrain import lora, qat
from lptrain.nn.select import DEFAULT_SKIP, excluded, matches
from lptrain.qat import bitswitch


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"wq": nn.Linear(32, 32), "w2": nn.Linear(32, 32)}) for _ in range(2)
        )
        self.lm_head = nn.Linear(32, 16)


def _changed(model: nn.Module) -> set[str]:
    """Names of the linear layers a conversion replaced."""
    return {n for n, m in model.named_modules() if n and type(m) is not nn.Linear} & {
        "blocks.0.wq", "blocks.0.w2", "blocks.1.wq", "blocks.1.w2", "lm_head"
    }  # fmt: skip


CONVERSIONS = {
    "convert": lambda m, **kw: lptrain.convert(m, "fp8-current", backend="emulated", **kw),
    "qat.prepare": lambda m, **kw: qat.prepare(m, qat.QATConfig(weight_bits=4), **kw),
    "bitswitch.prepare": lambda m, **kw: bitswitch.prepare(m, bitswitch.BitSwitchConfig(), **kw),
    "lora.apply": lambda m, targets=("*",), skip=DEFAULT_SKIP, **kw: lora.apply(
        m, lora.AdapterConfig(targets=list(targets), skip=list(skip)), **kw
    ),
}
ALL = {"blocks.0.wq", "blocks.0.w2", "blocks.1.wq", "blocks.1.w2", "lm_head"}


@pytest.mark.parametrize("how", CONVERSIONS)
def test_every_conversion_leaves_the_output_head_alone_by_default(how):
    assert _changed(CONVERSIONS[how](Tiny())) == ALL - {"lm_head"}


@pytest.mark.parametrize("how", CONVERSIONS)
def test_targets_skip_and_module_filter_fn_select_the_same_layers_everywhere(how):
    convert = CONVERSIONS[how]
    assert _changed(convert(Tiny(), targets=["wq"], skip=[])) == {"blocks.0.wq", "blocks.1.wq"}
    assert _changed(convert(Tiny(), skip=["blocks.1.*"])) == {
        "blocks.0.wq",
        "blocks.0.w2",
        "lm_head",
    }

    def only_block_0(module: nn.Module, fqn: str) -> bool:
        assert isinstance(module, nn.Linear)  # torchao's (module, fqn) order
        return fqn.startswith("blocks.0.")

    assert _changed(convert(Tiny(), module_filter_fn=only_block_0)) == {
        "blocks.0.wq",
        "blocks.0.w2",
    }


def test_a_glob_matches_the_full_name_or_its_last_part():
    assert matches("blocks.0.wq", ["wq"]) == "wq"
    assert matches("blocks.0.wq", ["blocks.*.wq"]) == "blocks.*.wq"
    assert matches("blocks.0.wq", ["wk", "blocks.1.*"]) is None
    layer = nn.Linear(2, 2)
    assert excluded("lm_head", layer, ["*"], DEFAULT_SKIP, None) == "skip 'lm_head'"
    assert excluded("x.wq", layer, ["wk"], (), None) == "not a target"
    assert excluded("x.wq", layer, ["*"], (), lambda m, n: False) == "module_filter_fn"
    assert excluded("x.wq", layer, ["*"], (), lambda m, n: True) is None


def test_convert_warns_only_about_skip_patterns_you_gave():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lptrain.convert(nn.Sequential(nn.Linear(8, 8)), "fp8-current", backend="emulated")
    with pytest.warns(UserWarning, match=r"matched no layer: \['nothing'\]"):
        lptrain.convert(nn.Sequential(nn.Linear(8, 8)), "fp8-current", skip=["nothing"])


@pytest.mark.parametrize("how", ["qat.prepare", "bitswitch.prepare", "lora.apply"])
def test_a_selection_that_matches_nothing_is_an_error(how):
    with pytest.raises(lptrain.ConfigError, match="^targets: "):
        CONVERSIONS[how](Tiny(), targets=["nothing"])


def test_convert_warns_about_target_patterns_that_match_nothing():
    with pytest.warns(UserWarning, match=r"target patterns matched no layer: \['nothing'\]"):
        lptrain.convert(Tiny(), "fp8-current", targets=["wq", "nothing"], backend="emulated")
