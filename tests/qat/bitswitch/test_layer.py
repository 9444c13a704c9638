"""BitSwitchLinear, prepare / calibrate / set_bits and the int8 store (lptrain/qat/bitswitch/
layer.py, prepare.py): switching the store equals the training forward at every bit-width, bit
for bit; house rules."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

import lptrain
from lptrain.qat import bitswitch as bs
from lptrain.qat.bitswitch import BitSwitchConfigError
from lptrain.testing import grads_plain_and_recomputed


def _model(act=True, **kw):
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc1", nn.Linear(64, 64))
    m.add_module("act", nn.GELU())
    m.add_module("fc2", nn.Linear(64, 32, bias=False))
    m.add_module("lm_head", nn.Linear(32, 16))
    return bs.prepare(m, bs.BitSwitchConfig(act_bits=act, **kw), log_fn=lambda s: None)


def test_prepare_calibrate_and_bits():
    said = []
    torch.manual_seed(0)
    bs.prepare(nn.Sequential(nn.Linear(8, 8)), {"bits": (2, 8)}, skip=(), log_fn=said.append)
    assert said == [
        "bitswitch: 1 layers, double rounding [8, 2] bits (stored 8), nearest, scale_grad "
        "corrected, inputs per bit-width (signed)"
    ]
    model = _model()
    assert type(model.lm_head) is nn.Linear and model.fc1.bits == (8, 6, 4, 2)
    x = torch.randn(16, 64)
    bs.set_bits(model, 4)
    bs.calibrate(model, x)
    assert bs.active_bits(model) == {"fc1": 4, "fc2": 4}  # restored
    for b in (8, 6, 4, 2):
        q = model.fc1.input_quantizer(b)
        assert bool(q.initialized) and q.step.item() == pytest.approx(
            float(2 * x.abs().mean() / q.p**0.5), rel=1e-6
        )
    bs.set_bits(model, {"fc1": 8, "fc2": 2})
    assert int(model.fc2.active_bits) == 2 and model.fc1.active == 8
    with pytest.raises(ValueError, match="bits: 5 is not a candidate"):
        bs.set_bits(model, 5)
    bad = [({"bits": ()}, "bits"), ({"bits": (8, 9)}, "bits"), ({"bits": (4, 4)}, "bits"),
           ({"rounding": "up"}, "rounding"), ({"scale_grad": "x"}, "scale_grad")]  # fmt: skip
    for kw, field in bad:
        with pytest.raises(BitSwitchConfigError) as e:
            bs.BitSwitchConfig(**kw)
        assert e.value.field == field


@pytest.mark.parametrize("recipe", [None, "fp8-current"])
@pytest.mark.parametrize("rounding", bs.ROUNDINGS)
def test_switching_the_int8_store_is_the_training_forward_at_every_bit(rounding, recipe):
    model = _model(rounding=rounding)
    if recipe:  # QAT on top of a precision recipe: the store keeps its GEMMs
        base = lptrain.convert(nn.Sequential(nn.Linear(64, 32)), recipe)
        model = bs.prepare(base, {"rounding": rounding}, skip=(), log_fn=lambda s: None)
    x = torch.randn(12, 64)
    bs.calibrate(model, x)
    model.train()
    model(x).sum().backward()  # a training step's worth of state
    model.eval()
    name, layer = next(bs.bitswitch_layers(model))
    store = layer.to_store()
    assert store.codes.dtype == torch.int8 and store.bits == 8
    assert store.switch.layout() == {"bits": [8, 6, 4, 2], "rounding": rounding, "act_signed": True}
    xin = torch.randn(5, 64)
    for b in layer.bits:
        layer.set_bits(b)
        with torch.no_grad():
            want = layer(xin)
        got = bs.switch_store(store, b)(xin)
        assert torch.equal(got, want), b
        assert got.dtype == want.dtype and bs.switch_store(store, b).bits == b
    with pytest.raises(ValueError, match="^bits: 3 is not a candidate"):
        bs.switch_store(store, 3)


def test_store_serializes_as_tensors(tmp_path):
    model = _model(act=False)
    store = model.fc1.to_store()
    save_model(store, str(tmp_path / "s.safetensors"))
    from lptrain.qat.quantized import QuantizedLinear

    shell = QuantizedLinear(64, 64, "affine", gemm="full")
    shell.set_affine(torch.zeros(64, 64), torch.zeros(64, 1), None, bits=8, group_size=64, n=-128)
    shell.set_bias(torch.zeros(64))
    shell.switch = bs.SwitchInfo.from_layout(store.switch.layout())
    load_model(shell, str(tmp_path / "s.safetensors"), strict=True)
    x = torch.randn(3, 64)
    assert torch.equal(bs.switch_store(shell, 2)(x), bs.switch_store(store, 2)(x))
    assert shell.switch.act_steps is None and shell.switch.hmt.isnan().all()


def test_eval_changes_nothing_and_state_dict_carries_bits():
    model = _model().eval()
    with pytest.raises(RuntimeError, match="8-bit input quantizer is not calibrated"):
        model(torch.randn(2, 64))
    bs.calibrate(model, torch.randn(8, 64))
    bs.set_bits(model, 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randn(4, 64) * 100)
    same = [
        torch.equal(state[k].nan_to_num(), v.nan_to_num()) for k, v in model.state_dict().items()
    ]
    assert all(same)  # (hmt is NaN: never measured here)
    other = _model()
    assert other.fc1.active == 8
    other.load_state_dict(state)
    assert bs.active_bits(other) == {"fc1": 6, "fc2": 6}  # the Python int follows the buffer


def test_recomputed_forward_is_bit_exact_and_non_finite_propagates():
    model = _model()
    x = torch.randn(8, 64, requires_grad=True)
    model(x).sum().backward()  # the first training forward initialises the 8-bit steps
    bs.calibrate(model, x.detach())
    bs.set_bits(model, 4)
    plain, recomputed = grads_plain_and_recomputed(model, x)
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed, strict=True))
    bad = torch.randn(2, 64)
    bad[0, 0] = float("nan")
    assert model(bad)[0].isnan().all() and torch.isfinite(model(bad)[1]).all()
    assert model(torch.zeros(0, 64)).shape == (0, 16)
