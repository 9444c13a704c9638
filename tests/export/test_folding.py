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


def test_a_format_2_layout_reads_its_nibble_packed_codes():
    """Exports written before codes were packed at their bit-width (format 2) kept 2- and
    3-bit codes in 4-bit slots and 5-7-bit codes in int8, and their layouts have no
    `code_bits`: `shell` rebuilds that storage, so they load as they were written."""
    from lptrain.export.folding import layout, shell
    from lptrain.numerics import pack_nibbles

    q = torch.randint(-2, 2, (4, 32), generator=torch.Generator().manual_seed(0))
    new = QuantizedLinear(32, 4, "affine")
    new.set_affine(q, torch.ones(4, 1), None, bits=2, group_size=32, n=-2)
    lay = layout(new)
    assert lay["code_bits"] == 2 and new.codes.shape == (4, 8)  # four codes per byte
    old = {**lay, "packed": True, "bytes_per_param": 0.5 + 4 / 32}
    del old["code_bits"]
    legacy = shell(old)
    assert legacy.codes.shape == (4, 16) and legacy.code_bits == 4
    legacy.load_state_dict({"codes": pack_nibbles((q + 2).to(torch.uint8)),
                            "step": torch.ones(4, 1)})  # fmt: skip
    assert torch.equal(legacy.integer_codes(), q.to(torch.int16))
    six = shell({**old, "bits": 6, "n": -32, "packed": False})
    assert six.codes.dtype == torch.int8 and six.codes.shape == (4, 32)
