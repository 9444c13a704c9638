"""`lptrain export --format hf`: the folded model as the `transformers` model it came from.

Every folded layer (a `QuantizedLinear`, always (out, in) inside lptrain) becomes the plain
layer the Hugging Face class has in its place, holding the deployable (dequantized) weight in
that class's layout: `nn.Linear` stores W as (out, in), GPT-2's `Conv1D` as (in, out). Which
class a place has comes from the architecture's skeleton (the model built from its config on
the meta device), not from what lptrain's layer happens to remember.

The export then checks itself before it is kept: every tensor's name and shape against the
skeleton (a missing key would be initialised at random by `from_pretrained`, with only a log
line), and the written directory reloaded by `transformers` must give the logits of the model
in memory. A wrong layout (a square (out, in) weight in a Conv1D loads without a word) fails
the export instead of exiting 0.

What a plain `transformers` model cannot hold is dropped, and said: a precision recipe's
quantized GEMMs and LSQ's input quantizers (`qat.act_bits`). The export prints the reloaded
model's validation loss next to the folded model's, so that cost is a number.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.errors import ConfigError
from lptrain.export import standalone
from lptrain.models import hf
from lptrain.nn.select import set_module
from lptrain.qat import QuantizedLinear
from lptrain.qat.layers import is_hf_conv1d

# The reloaded model computes what the model in memory computes, with the same classes and
# the same fp32 tensors: only a kernel that changes between the two calls could move a logit.
RELOAD_ATOL = 1e-5


def _bias(q: QuantizedLinear) -> torch.Tensor | None:
    """A base that kept its precision recipe holds the bias in its recipe layer."""
    if q.bias is not None or q.recipe_layer is None:
        return q.bias
    return q.recipe_layer.bias


@torch.no_grad()
def plain_layer(q: QuantizedLinear, slot: nn.Module, name: str) -> nn.Module:
    """`q`'s deployable (dequantized) weight and bias in a float layer of `slot`'s class and
    layout (`slot`: the layer in `hf.skeleton`); the hf and compressed-tensors exports' one way
    of writing a layer."""
    w, bias = q.dequantize(), _bias(q)  # w: (out, in)
    if is_hf_conv1d(slot):
        from transformers.pytorch_utils import Conv1D  # optional dependency (the hf extra)

        layer = Conv1D(q.out_features, q.in_features)  # y = x W + b, W (in, out)
        layer.weight.copy_(w.t())
        layer.bias.copy_(bias if bias is not None else torch.zeros(q.out_features))  # exact
        return layer
    if type(slot) is not nn.Linear:
        raise ConfigError("--format", f"hf: {name} is a {type(slot).__name__} in the "
                          "Hugging Face model, not a linear layer lptrain can write")  # fmt: skip
    if (slot.bias is None) != (bias is None):
        has = "has no" if bias is None else "has a"
        raise ConfigError("--format", f"hf: {name} {has} bias, unlike the Hugging Face layer")
    layer = nn.Linear(q.in_features, q.out_features, bias=bias is not None)
    layer.weight.copy_(w)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


@torch.no_grad()
def plain_model(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The folded `model` (an HFCausalLM) as its plain Hugging Face model, in place, and
    what it drops (one line each)."""
    net = model.model
    skeleton = hf.skeleton(net.config)
    dropped = set()
    # Before the swap: a folded layer's recipe lives in its QuantizedLinear's recipe_layer.
    if any(isinstance(m, lpnn.Linear) and m.recipe.quantizes for m in net.modules()):
        dropped.add("the precision recipe's quantized GEMMs: fp32 GEMMs")
    for name, m in list(net.named_modules()):
        if isinstance(m, QuantizedLinear):
            if m.input_quantizer is not None:
                dropped.add("the layer inputs' quantizers (qat.act_bits): inputs stay in float")
            set_module(net, name, plain_layer(m, skeleton.get_submodule(name), name))
    lpnn.unconvert(net)
    _check_shapes(net, skeleton)
    return model, sorted(dropped)


def _check_shapes(net: nn.Module, skeleton: nn.Module) -> None:
    have = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    bad = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
    if bad:
        k = bad[0]
        raise ConfigError(
            "--format",
            f"hf: {k} would be written as {have.get(k)}, the Hugging Face class expects "
            f"{want.get(k)} ({len(bad)} such tensors)",
        )


def save(model: nn.Module, opened, tmp: Path) -> None:
    """The plain model and the run's tokenizer, wherever it is (the base's directory, or a
    tokenizer.json), into `tmp`."""
    model.model.save_pretrained(str(tmp))
    spec = opened.tok.name
    if spec != "byte":
        standalone.copy_tokenizer(spec, opened.tok, tmp, sub="")
    if spec != "byte" and not (tmp / "tokenizer_config.json").is_file():
        # A bare tokenizer.json: tell transformers' AutoTokenizer which class reads it.
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")


@torch.no_grad()
def verify(model: nn.Module, tmp: Path, probe: torch.Tensor) -> nn.Module:
    """Reload `tmp` with transformers and compare its logits on `probe` (B, T) with the
    model in memory; the reloaded model (an HFCausalLM) when they agree."""
    back = hf.load(tmp, key="--out").eval()
    want = model.model.eval()(input_ids=probe, use_cache=False).logits
    got = back.model(input_ids=probe, use_cache=False).logits
    diff = float((got - want).abs().max())
    if not diff <= RELOAD_ATOL:  # NaN fails too
        raise ConfigError(
            "--format",
            "hf: the written model, reloaded by transformers, differs from the folded model "
            f"(max logit difference {diff:.3g})",
        )
    return back
