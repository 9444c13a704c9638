"""Every recipe's quantizers, bit for bit against a golden file, on any CPU.

What lptrain computes itself (scales, rounding, Hadamard rotations, stochastic rounding's bits,
delayed-scaling state, INT16 DFP and its exact INT32 GEMM) must not depend on the machine.
One Linear per recipe runs three forward and backward calls on operands built from integers
(exact on every CPU, unlike randn, whose vectorized log/cos differ per instruction set); the
test hashes what every quantizer returned, and the layer's state after the calls, into
tests/golden/quantizers.json. The GEMMs of the float recipes run in the BLAS and are left out
(tests/trainer/test_loop_golden.py bounds them); int16-dfp's GEMM is lptrain's own chunked
integer arithmetic, so its outputs are hashed too.

The README shows this passing under ATEN_CPU_CAPABILITY=default, avx2 and avx512. A deliberate
numerics change regenerates the file with
`LPTRAIN_UPDATE_GOLDEN=1 python -m pytest tests/nn/backends/test_emulated_golden.py` and says
why in its commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lptrain
from lptrain.nn.backends.emulated import EmulatedBackend

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "quantizers.json"
M, K, N = 48, 256, 128  # tokens, in_features, out_features: whole 128-blocks and 16x16 tiles
CALLS = 3
QUANTIZED = [r for r in lptrain.recipes.names() if r not in ("fp32", "bf16")]


def exact(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Values m * 2^e from integers only: m in [-2^10, 2^10), e in [-14, 2) (the spread tests
    scales and clamping), a few zeros, and one outlier row to move the amax."""
    m = torch.randint(-(2**10), 2**10, shape, generator=gen).float()
    e = torch.randint(-14, 2, shape, generator=gen)
    x = torch.ldexp(m, e - 10)
    x[0] *= 64.0
    return x


def _digest(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def run_recipe(name: str, monkeypatch) -> dict[str, str]:
    """sha256 of every quantizer result, of the DFP GEMM outputs and of the final state."""
    seen = hashlib.sha256()
    quantize, dfp, count = EmulatedBackend.quantize, EmulatedBackend._dfp, [0]

    def recording_quantize(self, call, gemm, operand, t, spec, **kw):
        out = quantize(self, call, gemm, operand, t, spec, **kw)
        seen.update(f"{gemm}.{operand}".encode() + _digest(out[0]))
        count[0] += 1
        return out

    def recording_dfp(call, gemm, op, t, spec, generator, amax):
        d = dfp(call, gemm, op, t, spec, generator, amax)
        seen.update(f"{gemm}.{op}".encode() + _digest(d.mantissa) + _digest(d.exponent))
        count[0] += 1
        return d

    monkeypatch.setattr(EmulatedBackend, "quantize", recording_quantize)
    monkeypatch.setattr(EmulatedBackend, "_dfp", staticmethod(recording_dfp))
    gen = torch.Generator().manual_seed(20)
    model = nn.Sequential(nn.Linear(K, N, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(exact(gen, N, K))
    lptrain.convert(model, name, backend="emulated", seed=7, log_fn=lambda _: None)
    outputs = hashlib.sha256()
    for _ in range(CALLS):
        x = exact(gen, M, K).requires_grad_(True)
        y = model(x)
        y.backward(exact(gen, M, N))
        if name == "int16-dfp":  # lptrain's own integer GEMM: exact on any CPU
            outputs.update(_digest(y) + _digest(x.grad) + _digest(model[0].weight.grad))
        model[0].weight.grad = None
    state = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if key != "0.weight":
            state.update(key.encode() + _digest(value))
    assert count[0] >= 6 * CALLS  # two operands in each of three GEMMs, every call
    got = {"quantized": seen.hexdigest(), "state": state.hexdigest()}
    if name == "int16-dfp":
        got["gemm_outputs"] = outputs.hexdigest()
    return got


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantizers_are_golden(name, monkeypatch):
    got = run_recipe(name, monkeypatch)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("LPTRAIN_UPDATE_GOLDEN") == "1":
        golden[name] = got
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
    assert got == golden[name], f"{name}: the quantizers' bits changed (see this file's docstring)"


def test_every_quantizing_recipe_has_a_golden_entry():
    assert sorted(json.loads(GOLDEN.read_text())) == sorted(QUANTIZED)


def test_quantizers_are_golden_without_vector_instructions():
    """The same bits with ATen's scalar kernels (ATEN_CPU_CAPABILITY=default) as with the
    machine's vector ones: nothing above may depend on the instruction set."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "LPTRAIN_UPDATE_GOLDEN": "0"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-k", "are_golden["]
    proc = subprocess.run([*cmd, __file__], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"{len(QUANTIZED)} passed" in proc.stdout
