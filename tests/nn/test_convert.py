"""Model conversion (nn/convert.py): skip globs, min_features, unconvert, amax reduction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lptrain
from lptrain import recipes
from lptrain.nn import Linear

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
