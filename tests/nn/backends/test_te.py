"""backend: te (nn/backends/te_mapping.py): the recipe -> TE recipe mapping, as data,
without TransformerEngine: the named recipes with a TE equivalent map with every field
explicit, variants map their fields, recipes without an equivalent are refused with the field
that differs; the mapping builds the TE objects it describes (checked on a stand-in module)."""

from __future__ import annotations

import contextlib
import copy
import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lptrain
from lptrain import recipes
from lptrain.nn.backends import BackendError
from lptrain.nn.backends import te as te_module
from lptrain.nn.backends.te import TEBackend
from lptrain.nn.backends.te_mapping import TEMPLATES, TEMapping, TEUnsupported, te_mapping


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


class _Recipe:
    made: list

    def __init__(self, **kw):
        self.made.append((type(self).__name__, kw))


class _Format:
    HYBRID, E4M3 = "Format.HYBRID", "Format.E4M3"


@pytest.fixture
def fake_te(monkeypatch):
    """A stand-in TransformerEngine 2.9.0 (TE needs CUDA): its recipe classes and its
    pytorch.Linear record the arguments they get. `.made`: [(class, kwargs)]."""
    made: list = []
    recipe = types.SimpleNamespace(Format=_Format, QParams=lambda **kw: ("QParams", kw))
    for cls in TEMPLATES:
        setattr(recipe, cls, type(cls, (_Recipe,), {"made": made}))

    class Linear(nn.Module):
        def __init__(self, in_features, out_features, bias=True, *, params_dtype, device):
            super().__init__()
            args = dict(in_features=in_features, out_features=out_features, bias=bias,
                        params_dtype=params_dtype, device=device)  # fmt: skip
            made.append(("Linear", args))
            w = torch.empty(out_features, in_features, dtype=params_dtype, device=device)
            self.weight = nn.Parameter(w)
            self.bias = nn.Parameter(w[:, 0].clone()) if bias else None

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    pkg = types.ModuleType("transformer_engine")
    pkg.__version__ = "2.9.0"
    pkg.__spec__ = importlib.machinery.ModuleSpec("transformer_engine", None)
    pkg.common = types.ModuleType("transformer_engine.common")
    pkg.common.recipe = recipe
    pkg.pytorch = types.ModuleType("transformer_engine.pytorch")
    pkg.pytorch.Linear = Linear
    pkg.pytorch.autocast = lambda enabled, recipe: contextlib.nullcontext()
    for name, mod in (("", pkg), (".common", pkg.common), (".pytorch", pkg.pytorch)):
        monkeypatch.setitem(sys.modules, "transformer_engine" + name, mod)
    monkeypatch.setattr(te_module, "_TE_LINEAR", None)  # the TE Linear class is built once
    return types.SimpleNamespace(pkg=pkg, made=made)


def test_build_makes_the_te_objects_it_describes(fake_te):
    out = te_mapping(recipes.get("fp8-current")).build()
    assert fake_te.made == [("Float8CurrentScaling", {"fp8_format": "Format.HYBRID",
                                                      "backward_override": None})]  # fmt: skip
    assert out.fp8_quant_fwd_weight == ("QParams", {"power_2_scale": False, "amax_epsilon": 0.0})


def _partitioned(layer: nn.Linear) -> nn.Linear:
    """`layer` as deepspeed.zero.Init leaves it on a rank: empty partitions, full ds_shape."""
    for name, p in list(layer.named_parameters()):
        part = nn.Parameter(torch.empty(0, dtype=torch.bfloat16))
        part.ds_shape, part.ds_numel, part.ds_id = p.shape, p.numel(), id(p)
        setattr(layer, name, part)
    return layer


def test_a_zero3_partitioned_layer_is_built_from_its_full_shape(fake_te, monkeypatch):
    from lptrain.nn import backends

    monkeypatch.setattr(backends, "_has_cuda", lambda: True)  # TE runs on CUDA devices only
    layer = _partitioned(nn.Linear(64, 32))
    weight, bias = layer.weight, layer.bias
    model = lptrain.convert(nn.Sequential(layer), "fp8-current", backend="te", log_fn=print)
    args = dict(in_features=64, out_features=32, bias=True, params_dtype=torch.bfloat16,
                device=torch.device("meta"))  # fmt: skip
    assert fake_te.made[-1] == ("Linear", args)
    # the partitioned parameters themselves: DeepSpeed gathers them around each forward
    assert model[0].weight is weight and model[0].bias is bias
    backend = TEBackend(recipes.get("fp8-current"), te_mapping(recipes.get("fp8-current")))
    with pytest.raises(BackendError, match=r"Conv1D \(transposed weight\) built under ZeRO-3"):
        backend.make_layer(_partitioned(nn.Linear(64, 32)), transposed=True)


def test_an_unpartitioned_layer_is_copied(fake_te, monkeypatch):
    from lptrain.nn import backends

    monkeypatch.setattr(backends, "_has_cuda", lambda: True)
    torch.manual_seed(0)
    plain = nn.Linear(64, 32)
    model = lptrain.convert(nn.Sequential(copy.deepcopy(plain)), "fp8-current", backend="te",
                            log_fn=print)  # fmt: skip
    args = dict(in_features=64, out_features=32, bias=True, params_dtype=torch.float32,
                device=torch.device("cpu"))  # fmt: skip
    assert fake_te.made[-1] == ("Linear", args)
    x = torch.randn(4, 64)
    assert torch.equal(model(x), plain(x))  # the stand-in's F.linear on the copied values


def test_nvfp4_needs_te_2_9_and_says_so(fake_te):
    cuda = torch.device("cuda")
    assert TEBackend.create(recipes.get("nvfp4"), cuda).mapping.cls == "NVFP4BlockScaling"
    fake_te.pkg.__version__ = "2.8.0+cu12"
    with pytest.raises(BackendError, match=r"^backend: backend 'te': recipe 'nvfp4' maps to "
                       r"NVFP4BlockScaling, which needs TransformerEngine >= 2\.9 "
                       r"\(installed: 2\.8\.0\+cu12\)"):  # fmt: skip
        TEBackend.create(recipes.get("nvfp4"), cuda)
    assert TEBackend.create(recipes.get("fp8-current"), cuda).mapping.cls == "Float8CurrentScaling"
