"""L4Q (lptrain/lora/l4q.py): custom backward vs the STE surrogate in float64 for A, B, s, b
and x, every leading dim summed, chunked = unchunked, W0 frozen, export bit for bit, memory."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lptrain.nn as lpnn
import lptrain.nn.chunked as chunked
from lptrain import recipes
from lptrain.lora import L4QFunction, L4QLinear, l4q_init_step
from lptrain.nn.backends.emulated import EmulatedBackend
from lptrain.numerics import QuantSpec, fake_quantize
from lptrain.qat import bounds, grad_scale
from lptrain.testing.memory import live_bytes, peak_bytes_during


def surrogate_weight(w0, A, B, s, b, alpha, n, p, group, g):
    """W_q through the straight-through surrogate of §6 (the spec of the backward)."""
    sg = s * g + (s - s * g).detach()
    bg = b * g + (b - b * g).detach()
    wc = (w0 + alpha * (B @ A)).reshape(w0.shape[0], -1, group)
    v = ((wc - bg.unsqueeze(-1)) / sg.unsqueeze(-1)).clamp(n, p)
    q = v + (torch.round(v) - v).detach()
    return (q * sg.unsqueeze(-1) + bg.unsqueeze(-1)).reshape(w0.shape)


def surrogate(x, w0, A, B, s, b, alpha, n, p, group, g):
    """Autograd through the straight-through surrogate of §6 (the spec of the backward)."""
    return x @ surrogate_weight(w0, A, B, s, b, alpha, n, p, group, g).T


def _tensors(out=12, inp=32, r=4, group=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    w0 = torch.randn(out, inp, generator=g, **d) * 0.5
    A = (torch.randn(r, inp, generator=g, **d) * 0.3).requires_grad_()
    B = (torch.randn(out, r, generator=g, **d) * 0.3).requires_grad_()
    s = (l4q_init_step(w0, -8, 7, group).double() * 0.7).requires_grad_()  # some clipping
    b = (torch.randn(s.shape, generator=g, **d) * 0.02).requires_grad_()
    x = torch.randn(3, 5, inp, generator=g, **d).requires_grad_()  # batch 3: not x[0] only
    dy = torch.randn(3, 5, out, generator=g, **d)
    return x, w0, A, B, s, b, dy


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("chunk_elems", [None, 64], ids=["one-chunk", "many-chunks"])
def test_backward_equals_surrogate_float64(bits, chunk_elems, monkeypatch):
    if chunk_elems:
        monkeypatch.setattr(chunked, "CHUNK_ELEMS", chunk_elems)  # 2 rows per chunk
    n, p = bounds(bits, True)
    x, w0, A, B, s, b, dy = _tensors(seed=bits)
    s = (s.detach() * 2.0 ** (4 - bits)).requires_grad_()  # keep some codes clipped
    args = (2.0, n, p, 8, grad_scale(8, p))
    out = L4QFunction.apply(x, w0, A, B, s, b, *args)
    ref = surrogate(x, w0, A, B, s, b, *args)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(out, (x, A, B, s, b), dy)
    want = torch.autograd.grad(ref, (x, A, B, s, b), dy)
    for name, a, w in zip("x A B s b".split(), got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12, msg=f"d{name}")


def test_init_and_w0_frozen_no_grad_no_optimizer_state():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = L4QLinear(base, r=4, alpha=8, bits=4, group_size=8)
    wg = base.weight.detach().reshape(16, 4, 8)
    want = torch.maximum(wg.amin(-1).abs() / 8, wg.amax(-1) / 7)
    assert torch.equal(layer.step.detach(), want) and torch.all(layer.offset == 0)
    assert torch.all(layer.lora_B == 0)  # W_c = W0 at step 0
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        layer(torch.randn(4, 7, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert layer.weight not in opt.state and len(opt.state) == 4  # A, B, s, b
    assert torch.equal(layer.weight, base.weight)


def test_export_forward_is_bit_identical(monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMS", 32 * 5)  # several chunks, last one short
    torch.manual_seed(1)
    layer = L4QLinear(nn.Linear(32, 19), r=4, alpha=8, bits=3, group_size=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
        layer.offset.normal_(0, 0.01)
    x = torch.randn(2, 9, 32)
    exported = layer.export()
    assert exported.bits == 3 and exported.codes.dtype == torch.uint8  # packed nibbles
    assert torch.equal(exported(x), layer(x))
    codes = exported.integer_codes()
    assert codes.min() >= -4 and codes.max() <= 3


def test_house_rules_non_finite_empty():
    layer = L4QLinear(nn.Linear(16, 8, bias=False), r=2, bits=4, group_size=8)
    assert layer(torch.zeros(0, 16)).shape == (0, 8)
    x = torch.ones(2, 16)
    x[0, 3] = float("inf")
    y = layer(x)
    assert not torch.isfinite(y[0]).all() and torch.isfinite(y[1]).all()
    with torch.no_grad():
        layer.weight[2, 0] = float("nan")
    assert torch.isnan(layer(torch.ones(1, 16))[0, 2])


def test_bad_group_and_bits():
    with pytest.raises(ValueError, match="group_size: 48 does not divide in_features 64"):
        L4QLinear(nn.Linear(64, 8), group_size=48)
    with pytest.raises(ValueError, match="bits: must be in 2..8, got 1"):
        L4QLinear(nn.Linear(64, 8), bits=1)


def _step_memory(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of one training step (forward, backward, AdamW) after a warm-up step:
    what lives before it plus the highest transient level during it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return live_bytes(model, opt) + peak_bytes_during(step)


def test_l4q_step_memory_near_lora_far_below_full_qat():
    from lptrain.lora import LoRALinear
    from lptrain.qat import QATLinear
    from lptrain.qat.quantizer import LSQQuantizer

    torch.manual_seed(0)
    n = 4096
    x = torch.randn(256, n)
    base = nn.Linear(n, n, bias=False)
    lora = _step_memory(LoRALinear(base, r=16, alpha=32), x)
    l4q = _step_memory(L4QLinear(base, r=16, alpha=32, bits=4, group_size=128), x)
    wq = LSQQuantizer(4, granularity="group", group_size=128, shape=(n, n))
    wq.init_from(base.weight)
    qat = _step_memory(QATLinear(nn.Linear(n, n, bias=False), wq), x)
    w_bytes = n * n * 4
    assert lora < 1.5 * w_bytes  # the fp32 base plus activations (4 MiB each)
    print(f"MiB: lora {lora / 2**20:.1f}, l4q {l4q / 2**20:.1f}, qat {qat / 2**20:.1f}")
    assert l4q <= 1.25 * lora, (l4q / 2**20, lora / 2**20)
    assert qat >= 3 * w_bytes and qat > 2.5 * l4q, (qat / 2**20, l4q / 2**20)


# -- under a precision recipe (an lptrain.nn.Linear base) ---------------------------------


def _dyadic(gen, shape, lo: int, hi: int, exp: int) -> torch.Tensor:
    """Integers in [lo, hi) times 2^exp: every GEMM and group sum of the L4Q below is exact,
    so its result does not depend on the BLAS or the CPU's instruction set."""
    return torch.ldexp(torch.randint(lo, hi, shape, generator=gen).float(), torch.tensor(exp))


def test_fp32_path_is_bit_identical_to_before():
    """Golden: sha256 of y, dx, dA, dB, ds, db computed by l4q.py before the recipe path
    (commit 7441c85), on dyadic inputs with clipped codes; the same on every CPU."""
    gen = torch.Generator().manual_seed(23)
    layer = L4QLinear(nn.Linear(32, 12), r=4, alpha=8.0, bits=4, group_size=8)
    with torch.no_grad():
        layer.weight.copy_(_dyadic(gen, (12, 32), -64, 64, -6))
        layer.bias.copy_(_dyadic(gen, (12,), -8, 8, -3))
        layer.lora_A.copy_(_dyadic(gen, (4, 32), -4, 4, -2))
        layer.lora_B.copy_(_dyadic(gen, (12, 4), -4, 4, -3))
        exps = torch.randint(-4, -1, (12, 4), generator=gen)
        layer.step.copy_(torch.ldexp(torch.ones(12, 4), exps))
        layer.offset.copy_(_dyadic(gen, (12, 4), -2, 2, -6))
    x = _dyadic(gen, (2, 3, 32), -8, 8, -3).requires_grad_()
    y = layer(x)
    y.backward(_dyadic(gen, (2, 3, 12), -8, 8, -3))
    assert (layer.offset.grad != 0).any()  # some codes clip
    h = hashlib.sha256()
    for t in (y, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.step.grad, layer.offset.grad):
        h.update(t.detach().contiguous().numpy().tobytes())
    assert h.hexdigest() == "63b63fe3584aea937bd426b8a32db148abb1ca8e922572ebad2efdd710de4655"


def _recipe_l4q(recipe: str, out: int = 12, inp: int = 32) -> L4QLinear:
    torch.manual_seed(0)
    base = lpnn.Linear(inp, out, recipe=recipe, backend="emulated")
    layer = L4QLinear(base, r=4, alpha=8, bits=4, group_size=16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
        layer.offset.normal_(0, 0.01)
        layer.step.mul_(0.8)  # some codes clip
    return layer


def _ste_wq(layer: L4QLinear) -> torch.Tensor:
    """W_q's value exactly (the export's dequantized codes), with §6's surrogate gradient."""
    value = layer.export().dequantize()
    w = surrogate_weight(
        layer.weight, layer.lora_A, layer.lora_B, layer.step, layer.offset, layer.scaling,
        layer.n, layer.p, layer.group_size, layer.grad_scale(),
    )  # fmt: skip
    return value + (w - w.detach())


def _reference(layer: L4QLinear) -> lpnn.Linear:
    """lptrain.nn.Linear's own path: a copy of the recipe layer (same seed, counter and state,
    so the same call), to run on W_q."""
    return copy.deepcopy(layer.recipe_layer)


@pytest.mark.parametrize("name", [r for r in recipes.names() if recipes.get(r).quantizes])
def test_recipe_gemms_equal_lptrain_linear_on_wq(name):
    """Every recipe composes: y and dx bit for bit, dA, dB, ds, db to rounding, against
    lptrain.nn.Linear's GEMMs run on W_q with §6's surrogate behind it (block scales across
    the L4Q groups, Hadamards, stochastic rounding, reuse, a trust mask, delayed state, INT32
    accumulation); the quantizer state is updated once per call."""
    layer = _recipe_l4q(name)
    ref = _reference(layer)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 32, generator=gen, requires_grad=True)
    dy = torch.randn(2, 5, 12, generator=gen)
    params = (layer.lora_A, layer.lora_B, layer.step, layer.offset)
    for _ in range(2):  # the second call sees the first one's state (histories, counters)
        y = layer(x)
        got = torch.autograd.grad(y, (x, *params), dy)
        xr = x.detach().clone().requires_grad_()
        y_ref = ref.gemm(xr, _ste_wq(layer)) + layer.bias
        want = torch.autograd.grad(y_ref, (xr, *params), dy)
        assert torch.equal(y, y_ref) and torch.equal(got[0], want[0])
        for what, a, w in zip(("A", "B", "s", "b"), got[1:], want[1:], strict=True):
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=f"d{what}")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, layer.recipe_layer.state_dict()[k]), k
    assert int(layer.recipe_layer.step) == 2


def test_fp8_current_quantizes_every_operand(monkeypatch):
    """The check that catches the recipe being dropped: the output is the float GEMM of the
    E4M3 fake-quantized x and W_q (not the FP32 one), and the recipe's quantizer sees x and
    W_q (output) and dy (grad_input; grad_weight reuses the copies, nn/reuse.py)."""
    seen = []
    quantize = EmulatedBackend.quantize

    def spy(self, call, gemm, operand, t, spec, **kw):
        if spec is not None:
            seen.append((gemm, operand))
        return quantize(self, call, gemm, operand, t, spec, **kw)

    monkeypatch.setattr(EmulatedBackend, "quantize", spy)
    layer = _recipe_l4q("fp8-current")
    x = torch.randn(3, 32, requires_grad=True)  # all three GEMMs run
    y = layer(x)
    e4m3 = QuantSpec("fp8_e4m3")
    wq = layer.export().dequantize()
    assert torch.equal(y, fake_quantize(x, e4m3) @ fake_quantize(wq, e4m3).T + layer.bias)
    assert not torch.equal(y, x @ wq.T + layer.bias)
    y.square().sum().backward()
    assert {("output", "input"), ("output", "weight"), ("grad_input", "grad_output")} == set(seen)
    layer.recipe_layer.quantization_enabled = False  # lptrain.nn.observe's switch: FP32 GEMMs
    with torch.no_grad():
        assert torch.equal(layer(x), x @ wq.T + layer.bias)


def test_recipe_house_rules_and_export():
    """Non-finite stays non-finite, empty works, a checkpointed (recomputed) forward gives the
    same gradients and counts one call, the export is the eval forward bit for bit."""
    layer = _recipe_l4q("fp8-delayed")
    assert layer(torch.zeros(0, 5, 32)).shape == (0, 5, 12)
    x = torch.randn(2, 32)
    x[0, 3] = float("inf")
    y = layer(x)
    assert not torch.isfinite(y[0]).any() and torch.isfinite(y[1]).all()
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 32)
    layer(x).square().sum().backward()
    checkpoint(twin, x, use_reentrant=False).square().sum().backward()
    for a, b in zip(layer.parameters(), twin.parameters(), strict=True):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    # The empty call counts nothing (plain math), the replay counts nothing a second time.
    assert int(layer.recipe_layer.step) == int(twin.recipe_layer.step) == 2
    exported = layer.eval().export()
    # The bias stays in `bias` (added after the GEMM, as in training), where `--format hf` reads it.
    assert exported.recipe_layer.recipe.name == "fp8-delayed" and exported.bias is not None
    assert torch.equal(exported(x), layer(x))


def test_precision_guard_switches_an_l4q_recipe_in_place():
    """The guard's fallback (Linear.set_recipe) on the weightless recipe layer: new state for
    the new recipe, and bf16 (no quantization) gives the FP32 L4Q forward."""
    layer = _recipe_l4q("nvfp4")
    x = torch.randn(3, 32)
    layer.recipe_layer.set_recipe("fp8-delayed")
    layer(x)
    assert layer.recipe_layer.quant_state is not None and int(layer.recipe_layer.step) == 1
    layer.recipe_layer.set_recipe("bf16")
    with torch.no_grad():
        assert torch.equal(layer(x), x @ layer.export().dequantize().T + layer.bias)
