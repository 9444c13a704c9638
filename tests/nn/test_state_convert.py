"""Checkpoint round-trip of quantizer state, bf16, model conversion and recipe parsing."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from lptrain.testing import sqnr_db
from torch import nn

import lptrain
from lptrain import recipes
from lptrain.nn import Linear, RecipeError, seed_quantizers


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 64)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attn": nn.Linear(64, 64),
                    "mlp": nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)),
                }
            )
            for _ in range(2)
        )
        self.small = nn.Linear(64, 8)
        self.lm_head = nn.Linear(64, 16, bias=False)

    def forward(self, idx):
        h = self.embed(idx)
        for b in self.blocks:
            h = h + b["attn"](h)
            h = h + b["mlp"](h)
        return self.lm_head(h) + self.small(h).sum(-1, keepdim=True)


def _build(recipe):
    torch.manual_seed(0)
    m = lptrain.convert(Nested(), recipe, skip=("lm_head",))
    seed_quantizers(m, 3)
    return m


def _steps(m, opt, n, start):
    outs = []
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(i)
        idx = torch.randint(0, 16, (4, 32), generator=g)
        out = m(idx)
        loss = out.float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        outs.append(out.detach())
    return torch.stack(outs)


@pytest.mark.parametrize("name", ["fp8-delayed", "nvfp4", "quartet", "fp4-ue5m3"])
def test_state_dict_round_trip_resumes_bit_for_bit(name: str):
    recipe = recipes.get(name)
    if name == "fp4-ue5m3":  # exercise the sample-and-hold tensor reference too
        recipe = recipes.from_dict({"base": name, "grad_weight": {"input": {"amax_refresh": 2}}})
    m = _build(recipe)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    _steps(m, opt, 3, 0)
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    want = _steps(m, opt, 3, 3)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    fresh = _build(recipe)
    seed_quantizers(fresh, 99)  # the checkpoint must override the generators
    fresh.load_state_dict(ckpt["model"])
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    got = _steps(fresh, opt2, 3, 3)
    assert torch.equal(got, want)
    for (k, a), (_, b) in zip(m.state_dict().items(), fresh.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    if name == "fp8-delayed":
        hist = m.blocks[0]["attn"].quant_state["output_input"].amax_history
        assert (hist > 0).sum() == 6  # six forward calls recorded


def test_plain_nn_linear_checkpoint_loads_into_converted_model():
    torch.manual_seed(0)
    plain = Nested()
    m = lptrain.convert(copy.deepcopy(plain), "fp8-delayed")
    m.load_state_dict(plain.state_dict())  # strict: quantizer keys may be missing


@pytest.mark.parametrize("name", ["fp8-current", "fp8-delayed", "nvfp4", "mxfp8"])
def test_autocast_bf16(name: str):
    torch.manual_seed(0)
    m = lptrain.convert(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)), name)
    x = torch.randn(32, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert m[0].weight.dtype == torch.float32 and m[0].weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    # As accurate as the FP32 run against the unquantized model (bf16 activations move some
    # elements across rounding boundaries, so the two runs differ at the recipe's error level).
    ref = lptrain.unconvert(copy.deepcopy(m))(x.detach()).double()
    assert sqnr_db(y, ref) > sqnr_db(m(x.detach()), ref) - 2


@pytest.mark.parametrize("name", ["fp8-delayed", "fp4-ue5m3", "nvfp4"])
def test_bf16_model_keeps_fp32_quantizer_state(name: str):
    torch.manual_seed(0)
    recipe = (
        recipes.from_dict({"base": name, "output": {"input": {"amax_refresh": 4}}})
        if name == "fp4-ue5m3"
        else name
    )
    m = lptrain.convert(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)), recipe)
    m.to(torch.bfloat16)
    lin = m[0]
    assert lin.weight.dtype == torch.bfloat16
    for key, buf in lin.named_buffers():
        if key.startswith("quant_state") or key.startswith("signs_"):
            want = torch.int64 if key.endswith("calls") else torch.float32
            assert buf.dtype == want, key
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert lin.weight.grad.dtype == torch.bfloat16 and torch.isfinite(lin.weight.grad).all()
    assert x.grad.dtype == torch.bfloat16
    if name == "fp8-delayed":
        assert lin.quant_state["output_input"].amax_history.max() > 0


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


@pytest.mark.parametrize("backend", ["te", "triton"])
def test_unavailable_backends_error_clearly(backend: str):
    with pytest.raises(ValueError, match=rf"backend '{backend}' is not available.*emulated"):
        lptrain.convert(nn.Sequential(nn.Linear(8, 8)), "fp8-current", backend=backend)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        Linear(8, 8, backend="cuda")


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
