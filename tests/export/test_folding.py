"""The deploy fold (lptrain/export/folding.py) is the three library converts in one call:
`lora.merge_and_unload`, `qat.convert`, `qat.bitswitch.convert`; each is public on its own."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lptrain import lora, qat
from lptrain.export import fold
from lptrain.qat import QuantizedLinear, bitswitch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))


def _prepared(kind: str) -> nn.Module:
    m = _model()
    if kind == "qat":
        qat.prepare(m, qat.QATConfig(weight_bits=4, act_bits=8), skip=[])
        qat.calibrate(m, torch.randn(8, 32))
    elif kind == "bitswitch":
        bitswitch.prepare(m, bitswitch.BitSwitchConfig(bits=(8, 4)), skip=[])
        bitswitch.calibrate(m, torch.randn(8, 32))
    else:
        lora.apply(m, lora.AdapterConfig(type=kind, r=4, skip=[], group_size=32))
        for _, layer in lora.adapter_layers(m):
            nn.init.normal_(layer.lora_B, std=0.1)
    return m.eval()


CONVERT = {
    "qat": qat.convert,
    "bitswitch": bitswitch.convert,
    "lora": lora.merge_and_unload,
    "l4q": lora.merge_and_unload,
}


@pytest.mark.parametrize("kind", CONVERT)
def test_fold_is_the_library_convert(kind):
    model, x = _prepared(kind), torch.randn(4, 32)
    by_library = CONVERT[kind](copy.deepcopy(model))
    how = fold(model)
    assert sorted(how) == ["0", "2"] and all(how.values())
    with torch.no_grad():
        assert torch.equal(model(x), by_library(x))
    assert [type(m) for m in model] == [type(m) for m in by_library]
    if kind != "lora":  # a LoRA layer on a float base folds into that float base
        assert isinstance(model[0], QuantizedLinear)


def test_bitswitch_convert_at_a_bit_width_is_the_switched_store():
    model = _prepared("bitswitch")
    store = bitswitch.convert(copy.deepcopy(model))
    at4 = bitswitch.convert(copy.deepcopy(model), bits=4)
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = bitswitch.switch_store(store[0], 4)(x)
        assert torch.equal(at4[0](x), want)
        assert not torch.equal(at4[0](x), store[0](x))  # 4 bits is not the 8-bit store
