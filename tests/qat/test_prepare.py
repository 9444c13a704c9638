"""qat.prepare / QATLinear / calibrate (lptrain/qat/prepare.py): wrapping, composition with
lptrain.nn.Linear recipes, calibration, eval and recompute rules, export bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lptrain
import lptrain.qat as qat
from lptrain.qat import QATConfig, QATConfigError, QATLinear
from lptrain.testing import grads_plain_and_recomputed


def _model():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc1", nn.Linear(64, 64))
    m.add_module("act", nn.GELU())
    m.add_module("fc2", nn.Linear(64, 32))
    m.add_module("lm_head", nn.Linear(32, 16))
    return m


def test_prepare_wraps_eligible_layers_and_logs():
    said = []
    model = qat.prepare(_model(), QATConfig(weight_bits=4, act_bits=8), log_fn=said.append)
    assert isinstance(model.fc1, QATLinear) and isinstance(model.fc2, QATLinear)
    assert type(model.lm_head) is nn.Linear  # skipped by default
    assert said == ["qat: 2 layers, lsq weights 4 bits (channel), inputs 8 bits"]
    assert model.fc1.weight_quantizer.step.shape == (64, 1)
    assert all(qat.is_quantizer_param(p) for n, p in model.named_parameters() if "step" in n)


def test_calibrate_then_train_with_lptrain_recipe_base():
    model = lptrain.convert(_model(), "fp8-current", skip=["lm_head"])
    qat.prepare(model, {"method": "lsq+", "weight_bits": 4, "act_bits": 8,
                        "weight_granularity": "group", "group_size": 32})  # fmt: skip
    x = torch.randn(16, 64)
    qat.calibrate(model, x)
    aq = model.fc1.input_quantizer
    assert bool(aq.initialized) and aq.step.item() == pytest.approx(
        float((x.max() - x.min()) / 255), rel=1e-6
    )
    assert int(model.fc1.base.step) == 0  # calibration ran in eval: recipe state untouched
    model(x).square().mean().backward()
    assert (
        model.fc1.base.weight.grad is not None and model.fc1.weight_quantizer.step.grad is not None
    )
    assert aq.offset.grad is not None and int(model.fc1.base.step) == 1


def test_eval_needs_calibration_and_changes_nothing():
    model = qat.prepare(_model(), QATConfig(act_bits=8)).eval()
    with pytest.raises(RuntimeError, match="input quantizer is not calibrated"):
        model(torch.randn(2, 64))
    model.train()
    model(torch.randn(4, 64))  # the first training forward initialises
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 64) * 100)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_recomputed_forward_is_bit_exact():
    torch.manual_seed(1)
    model = qat.prepare(_model(), QATConfig(method="lsq+", act_bits=6))
    x = torch.randn(8, 64, requires_grad=True)
    model(x).sum().backward()  # initialise
    plain, recomputed = grads_plain_and_recomputed(model, x)
    assert all(torch.equal(a, b) for a, b in zip(plain, recomputed, strict=True))


@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
@pytest.mark.parametrize("recipe", [None, "fp8-current"])
def test_export_is_bit_identical(gran, recipe):
    model = _model()
    if recipe:
        lptrain.convert(model, recipe, skip=["lm_head"])
    qat.prepare(model, QATConfig(method="lsq+", weight_bits=3, weight_granularity=gran,
                                 group_size=16, act_bits=8))  # fmt: skip
    x = torch.randn(8, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        want = model(x)
        model.fc1, model.fc2 = model.fc1.export(), model.fc2.export()
        assert model.fc1.codes.dtype == torch.uint8  # 3-bit codes, packed
        assert torch.equal(model(x), want)


def test_bad_config_names_field():
    with pytest.raises(QATConfigError, match="^weight_bits: must be in 2..8, got 1"):
        QATConfig(weight_bits=1)
    with pytest.raises(QATConfigError, match="^method: 'lsq2'"):
        QATConfig(method="lsq2")
    with pytest.raises(QATConfigError, match="^group_size: .*48 does not divide in_features 64"):
        qat.prepare(_model(), QATConfig(weight_granularity="group", group_size=48))
