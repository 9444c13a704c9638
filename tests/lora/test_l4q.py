"""L4Q (lptrain/lora/l4q.py): custom backward vs the STE surrogate in float64 for A, B, s, b
and x, every leading dim summed, chunked = unchunked, W0 frozen, export bit for bit, memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lptrain.nn.chunked as chunked
from lptrain.lora import L4QFunction, L4QLinear, l4q_init_step
from lptrain.qat import bounds, grad_scale
from lptrain.testing.memory import live_bytes, peak_bytes_during


def surrogate(x, w0, A, B, s, b, alpha, n, p, group, g):
    """Autograd through the straight-through surrogate of §6 (the spec of the backward)."""
    sg = s * g + (s - s * g).detach()
    bg = b * g + (b - b * g).detach()
    wc = (w0 + alpha * (B @ A)).reshape(w0.shape[0], -1, group)
    v = ((wc - bg.unsqueeze(-1)) / sg.unsqueeze(-1)).clamp(n, p)
    q = v + (torch.round(v) - v).detach()
    wq = (q * sg.unsqueeze(-1) + bg.unsqueeze(-1)).reshape(w0.shape)
    return x @ wq.T


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
