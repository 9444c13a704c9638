"""Capability self-test of a fast backend on the device it is about to run on.

Peers have shipped silently wrong numbers on GPUs their kernels were never built for. Before
`resolve` hands out the Triton backend it runs every operand quantizer of the recipe on a few
random tensors (ordinary values, a zero row, a huge and a tiny row) on the target device and
compares with the reference:

* round to nearest: the dequantized operand bit for bit against lptrain.numerics.fake_quantize
  (FP8 tensorwise also: the transposed copy against the transpose; rowwise FP8: the
  column-wise copy against fake_quantize of the transpose);
* stochastic rounding: bit for bit against kernels.reference.fake_quantize_with_bits fed the
  Philox bits the kernel draws (computed on the host by the pure-PyTorch twin);
* each GEMM once: within matmul.bound of the FP64 product of the reference operands;
* INT16 DFP: mantissas and exponent against lptrain.numerics.dfp_quantize.

The first disagreement is returned as one sentence; `resolve` then refuses the backend (or
`auto` falls back to the emulated one) and says why. Results are memoized per (recipe, device):
the test is a pure function of them and costs a few kernel compilations.
"""

from __future__ import annotations

import torch

from lptrain.nn.backends import matmul as mm
from lptrain.nn.recipe import GEMMS
from lptrain.numerics import QuantSpec, ScalingState, dfp_quantize, fake_quantize

_DONE: dict[tuple, str | None] = {}


def _operand(rows: int, cols: int, seed: int, device, wild: bool = True) -> torch.Tensor:
    """Gaussian rows; `wild` adds a zero, a tiny (1e-20) and a huge (1e20) row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 2.0
    if wild:
        x[1] = 0.0
        x[2] *= 1e-20
        x[3] *= 1e20
    return x.to(device)


def _rows(spec: QuantSpec) -> int:
    """Operand rows for `spec`: two of the kernels' 32-row tiles (so reductions across tiles
    run), or one 2-D scale tile's height when taller. 128 columns: whole 128-wide blocks."""
    return max(64, spec.tile[0] if spec.tile is not None else 1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


def _signs(spec: QuantSpec, device) -> torch.Tensor | None:
    if not (spec.hadamard and spec.hadamard_signs):
        return None
    g = torch.Generator().manual_seed(spec.hadamard)
    return (torch.randint(0, 2, (spec.hadamard,), generator=g) * 2 - 1).float().to(device)


def _check_spec(backend, spec: QuantSpec, device, seed: int) -> str | None:
    # optional dependency: lptrain.kernels imports triton (the gpu extra)
    from lptrain.kernels.reference import fake_quantize_with_bits, philox_bits

    x = _operand(_rows(spec), 128, seed, device)
    signs = _signs(spec, device)
    state = kw = None
    if spec.scaling == "delayed" or spec.amax_refresh > 1:  # a fresh state on each side
        state, ref_state = (
            ScalingState(spec.history_len, device),
            ScalingState(spec.history_len, device),
        )
        kw = dict(state=ref_state)
    # The backend writes a column-wise copy of a row-scaled operand only for dY in round to
    # nearest without a rotation (triton_rules.colwise_dy); test the copies it writes.
    colwise = spec.scaling == "row" and spec.rounding == "nearest" and not spec.hadamard
    write_t = spec.scaling != "row" or colwise
    op, _ = backend.quantize_operand(
        x, spec, state=state, update=state is not None, signs=signs, seed=99, want_t=write_t
    )
    got = op.dequantize()
    if spec.rounding == "nearest":
        want = fake_quantize(x, spec, signs=signs, **(kw or {}))
    else:
        bits = philox_bits(99, torch.arange(x.numel())).reshape(x.shape)
        want = fake_quantize_with_bits(
            x.cpu(), spec, bits, signs=None if signs is None else signs.cpu()
        ).to(device)
    if not _same(got, want):
        bad = int((got != want).sum())
        return f"{spec.format}/{spec.scaling}/{spec.scale_format}: {bad} values differ"
    if op.values_t is not None:
        # tensorwise: the same codes transposed; rowwise: x.T quantized row-wise (one scale
        # per column of x), not the row-scaled values transposed
        want_t = fake_quantize(x.T, spec) if spec.scaling == "row" else got.t()
        if not _same(op.t().dequantize(), want_t):
            return f"{spec.format}/{spec.scaling}: the transposed copy differs"
    return None


def _check_gemm(backend, sa: QuantSpec, sb: QuantSpec, device) -> str | None:
    sa, sb = (s.replace(rounding="nearest") for s in (sa, sb))
    if "delayed" in (sa.scaling, sb.scaling):  # the same cast path with current scales
        sa, sb = (_current(s) if s.scaling == "delayed" else s for s in (sa, sb))
    a = _operand(_rows(sa), 128, 1, device, wild=False)
    b = _operand(_rows(sb), 128, 2, device, wild=False)
    signs = _signs(sa, device)
    qa, _ = backend.quantize_operand(a, sa, signs=signs)
    qb, _ = backend.quantize_operand(b, sb, signs=signs)
    fa, fb = qa.dequantize(), qb.dequantize()
    got = mm.gemm(qa, qb).double()
    want = fa.double() @ fb.double().T
    err = (got - want).abs()
    lim = mm.bound(fa, fb, device.type)
    if not bool((err <= lim).all()):
        worst = float((err / lim.clamp(min=1e-300)).max())
        return f"GEMM {sa.format} x {sb.format}: {worst:.1f}x beyond the accumulation bound"
    return None


def _current(s: QuantSpec) -> QuantSpec:
    return s.replace(scaling="tensor", history_len=1024, amax_algo="max", margin=0,
                     delayed_init="one")  # fmt: skip


def _check_dfp(spec: QuantSpec, device) -> str | None:
    # optional dependency: lptrain.kernels imports triton (the gpu extra)
    from lptrain.kernels.dfp import quantize_dfp

    x = _operand(64, 128, 3, device)
    got, want = quantize_dfp(x, bits=spec.fmt.bits), dfp_quantize(x, bits=spec.fmt.bits)
    if not (torch.equal(got.mantissa, want.mantissa) and torch.equal(got.exponent, want.exponent)):
        return f"DFP {spec.fmt.name}: mantissas or exponent differ"
    return None


def self_test(backend, recipe, device: torch.device) -> str | None:
    """None when `backend` reproduces the reference for `recipe` on `device`, else why not."""
    key = (backend.name, recipe, str(device))
    if key not in _DONE:
        _DONE[key] = _run(backend, recipe, device)
    return _DONE[key]


def _run(backend, recipe, device) -> str | None:
    seen = set()
    try:
        for g in GEMMS:
            gr = recipe.gemm(g)
            if gr.accumulate == "int32":
                why = _check_dfp(gr.a, device) or _check_dfp(gr.b, device)
            else:
                specs = [s for s in (gr.a, gr.b) if s is not None and s not in seen]
                seen.update(specs)
                why = next((w for s in specs if (w := _check_spec(backend, s, device, 7))), None)
                if why is None and gr.a is not None and gr.b is not None:
                    why = _check_gemm(backend, gr.a, gr.b, device)
            if why:
                return f"{g}: {why}"
    except Exception as exc:  # a kernel that does not compile or launch here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None
