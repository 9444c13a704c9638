"""FP8 saved activations (models/saved.py, `precision.saved_activations: fp8`): the forward is
the plain path's bit for bit; gradients against the plain path within an SQNR bound per op;
nothing saved without a gradient to record; checkpointing, empty and non-finite inputs; the
meta measurement of `lptrain plan` matches what the real path saves."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lptrain.config.schema import ModelConfig
from lptrain.distributed.memory import saved_bytes
from lptrain.errors import ConfigError
from lptrain.models import saved
from lptrain.models.decoder import (
    Block,
    build_model,
    model_args,
    rms_norm,
    set_saved_activations,
    swiglu,
)
from lptrain.numerics import QuantSpec
from tests.helpers import train_losses

B, T, C, H, HD, FFN = 2, 64, 256, 4, 64, 512


def _realish(shape, g: torch.Generator) -> torch.Tensor:
    """Activations as LLMs have them: per-channel magnitudes spread over decades (log-normal)
    and two outlier channels 30x the rest."""
    ch = torch.exp(torch.randn(shape[-1], generator=g))
    ch[torch.randperm(shape[-1], generator=g)[:2]] *= 30
    return torch.randn(shape, generator=g) * ch


def _attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _case(op: str, kind: str):
    """(fn, activations, other inputs, grad of the output), bf16, seeded."""
    g = torch.Generator().manual_seed(0)
    draw = (
        (lambda s: torch.randn(s, generator=g)) if kind == "random" else (lambda s: _realish(s, g))
    )
    bf = torch.bfloat16
    if op == "rmsnorm":
        w = (1 + 0.1 * torch.randn(C, generator=g)).to(bf)
        return (lambda x, w: rms_norm(x, w, 1e-5)), (draw((B, T, C)).to(bf),), (w,), (B, T, C)
    if op == "swiglu":
        return swiglu, (draw((B, T, FFN)).to(bf), draw((B, T, FFN)).to(bf)), (), (B, T, FFN)
    qkv = tuple((draw((B, H, T, HD)) * s).to(bf) for s in (0.3, 0.3, 1.0))  # softmax not saturated
    return _attention, qkv, (), (B, H, T, HD)


def _grads(fn, acts, others, shape, fp8: bool):
    ins = [t.clone().requires_grad_() for t in (*acts, *others)]
    n = len(acts)
    y = saved.keep_fp8(fn, tuple(ins[:n]), *ins[n:]) if fp8 else fn(*ins)
    y.backward(torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
    return y, [t.grad for t in ins]


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return float(10 * torch.log10(ref.square().sum() / (ref - x).square().sum()))


# Per op and input kind, the gradient SQNR floor (dB) of each input (activations, then the
# weight), 2-3 dB under the values measured with E4M3 and one FP32 scale per 1x128 group (bf16,
# seed 0: the comments; then per-tensor scale / E5M2 / power-of-two scales). On the real-ish
# inputs each of those three falls under at least one bound of each op (test below); on
# Gaussian inputs a per-tensor or power-of-two scale is within 1 dB of per-group (nothing to
# separate there) and E5M2 is 3-6 dB under.
BOUNDS = {
    ("rmsnorm", "random"): (45, 30),  # 47.6, 32.2
    ("rmsnorm", "realish"): (42, 42),  # 45.3, 44.9 (34.9, 40.3 / 41.6, 39.2 / 35.3, 36.0)
    ("swiglu", "random"): (29, 28),  # 31.4, 30.2
    ("swiglu", "realish"): (32, 33),  # 34.5, 35.6 (31.0, 31.9 / 28.9, 29.7 / 30.7, 31.2)
    ("attention", "random"): (27, 27, 45),  # 29.2, 29.2, 47.6
    ("attention", "realish"): (27, 27, 30),  # 29.6, 29.6, 32.5 (22.3, 23.2, 25.9 / 22.3, ...)
}


def _measure(op: str, kind: str) -> list[float]:
    fn, acts, others, shape = _case(op, kind)
    y_ref, ref = _grads(fn, acts, others, shape, fp8=False)
    y, got = _grads(fn, acts, others, shape, fp8=True)
    assert torch.equal(y, y_ref)  # the forward is the plain path's, bit for bit
    return [sqnr_db(r, q) for r, q in zip(ref, got, strict=True)]


@pytest.mark.parametrize("op, kind", list(BOUNDS))
def test_forward_is_exact_and_gradients_meet_the_sqnr_bound(op, kind):
    got = _measure(op, kind)
    assert all(g >= b for g, b in zip(got, BOUNDS[op, kind], strict=True)), (got, BOUNDS[op, kind])


@pytest.mark.parametrize(
    "wrong",
    [
        lambda right: QuantSpec("fp8_e4m3", scaling="tensor"),
        lambda right: right.replace(format="fp8_e5m2"),
        lambda right: right.replace(pow2_scale=True),
    ],
    ids=["per-tensor-scale", "e5m2", "pow2-scale"],
)
@pytest.mark.parametrize("op", ["rmsnorm", "swiglu", "attention"])
def test_a_wrong_quantizer_fails_the_real_ish_bound(monkeypatch, op, wrong):
    right = saved.group_spec
    monkeypatch.setattr(saved, "group_spec", lambda n: wrong(right(n)))
    got = _measure(op, "realish")
    assert any(g < b for g, b in zip(got, BOUNDS[op, "realish"], strict=True)), got


def _nano(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="nano", **kw), 256, 32)


def _grads_of(model, tokens):
    model.zero_grad()
    loss = model(tokens)
    loss.backward()
    return loss, [p.grad.clone() for p in model.parameters()]


def test_model_forward_is_exact_and_checkpointing_is_bit_identical():
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    plain, fp8, ckpt = _nano(), _nano(), _nano(checkpointing=True)
    for m in (fp8, ckpt):
        assert set_saved_activations(m, "fp8") == 2 * 4 + 1  # 2 blocks x 4 ops, final norm
    loss, _ = _grads_of(plain, tokens)
    loss8, g8 = _grads_of(fp8, tokens)
    lossc, gc = _grads_of(ckpt, tokens)
    assert torch.equal(loss8, loss) and torch.equal(lossc, loss)
    assert all(torch.equal(a, b) for a, b in zip(g8, gc, strict=True))
    assert plain.state_dict().keys() == fp8.state_dict().keys()  # a setting, not state
    assert "saved_activations=fp8" in repr(fp8.layers[0].attn_norm)


def test_no_gradient_saves_nothing(monkeypatch):
    model = _nano()
    set_saved_activations(model, "fp8")
    monkeypatch.setattr(saved, "quantize", lambda *a, **k: pytest.fail("quantized without grad"))
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        model(tokens)
    model.eval().requires_grad_(False)
    model(tokens)


@pytest.mark.parametrize("op", ["rmsnorm", "swiglu", "attention"])
def test_nonfinite_inputs_give_nonfinite_gradients(op):
    fn, acts, others, shape = _case(op, "random")
    first = acts[0].clone()
    first.view(-1)[0] = float("inf")
    _, grads = _grads(fn, (first, *acts[1:]), others, shape, fp8=True)
    assert not torch.isfinite(grads[0]).all()


def test_empty_batch_runs_forward_and_backward():
    args = model_args(ModelConfig(preset="nano"), 256, 16)
    block = Block(args)
    set_saved_activations(block, "fp8")
    x = torch.randn(2, 0, args.dim, requires_grad=True)
    cos, sin = torch.randn(0, 16), torch.randn(0, 16)
    block(x, cos, sin).sum().backward()
    assert x.grad.shape == x.shape and block.attn.wq.weight.grad.abs().sum() == 0


def test_meta_measurement_is_what_the_real_path_saves():
    """lptrain plan measures on `meta`: codes and scales of the same shapes and dtypes."""
    args = model_args(ModelConfig(preset="nano"), 256, 16)
    torch.manual_seed(0)
    block = Block(args).to(torch.bfloat16)
    set_saved_activations(block, "fp8")
    sizes = {}
    for device in ("cpu", "meta"):
        b = copy.deepcopy(block).to(device)
        x = torch.randn(2, 16, args.dim, dtype=torch.bfloat16, device=device, requires_grad=True)
        cos, sin = (torch.randn(16, 16, device=device) for _ in "cs")
        sizes[device] = saved_bytes(b, x, cos, sin)
    assert sizes["cpu"] == sizes["meta"]
    set_saved_activations(block, "none")
    x = torch.randn(2, 16, args.dim, dtype=torch.bfloat16, requires_grad=True)
    assert saved_bytes(block, x, *(torch.randn(16, 16) for _ in "cs")) > 1.8 * sizes["cpu"]


@pytest.mark.parametrize("n, block", [(4096, 128), (96, 32), (7, None)])
def test_groups_follow_the_last_dim_and_meta_has_the_real_shapes(n, block):
    assert saved.group_spec(n).block_size == block  # None: one scale per row
    x = torch.randn(3, n)
    real, meta = saved._pack(x)[1], saved._pack(x.to("meta"))[1]
    assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in meta]


def test_a_model_without_the_ops_or_with_attention_dropout_is_refused():
    with pytest.raises(ConfigError, match="^precision.saved_activations: Sequential has no"):
        set_saved_activations(torch.nn.Sequential(torch.nn.Linear(4, 4)), "fp8")
    with pytest.raises(ConfigError, match="^model.dropout: must be 0"):
        set_saved_activations(_nano(dropout=0.1), "fp8")
    set_saved_activations(_nano(dropout=0.1), "none")  # nothing recomputed: allowed


def test_the_combined_recipe_trains(cli, tmp_path):
    """tiny-fp8-compact.yaml end to end: FP8 GEMMs, fp8 moments, bf16-sr weights and FP8
    saved activations (nano, 3 steps)."""
    proc = cli("tiny-fp8-compact.yaml", "run.max_steps=3", run_dir=tmp_path / "run")
    assert (
        "precision.saved_activations: 9 RMSNorm/SwiGLU/attention ops keep fp8"
        in proc.stderr + proc.stdout
    )
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
