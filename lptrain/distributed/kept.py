"""What one converted Linear keeps, measured on real layers: the plan's figures for quantized
layers (distributed/memory.py).

A quantized layer's saved tensors cannot be measured on `meta` (its quantizers read amaxes and
scales), so a `Kept` profile is measured once per recipe and backend on two small real layers
that read the same input, with `saved_tensors_hooks`, at two token counts:

- per token: bytes saved per input element besides the input itself (FP8 codes, their
  transposed copy, per-row scales, trust masks), for the first layer reading a tensor and for a
  further one (zero where the copy is shared, nn/shared.py);
- per parameter: bytes saved per weight element until the layer's backward (a quantized weight
  copy, unless it is the cached one), and bytes the backend keeps per weight element across the
  micro-batches of a step (the Triton backend's weight cache, after a forward and a backward);
- whether the layer keeps its high-precision input too.

A quantized tensor's real storage is counted (a Triton `QuantizedOperand` looks like FP32 to
autograd, but holds codes and scales). The Triton backend is measured where its kernels run:
on a GPU, or on the CPU under Triton's interpreter, which Triton picks when it is first
imported, so elsewhere a child process with the interpreter on measures it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.errors import ConfigError
from lptrain.nn.backends import EmulatedBackend
from lptrain.nn.backends.operand import QuantizedOperand

WIDTH = 128  # a multiple of every block, tile and rotation size of the named recipes
TOKENS = (32, 64)


@dataclass(frozen=True)
class Kept:
    backend: str  # the backend measured
    keeps_input: bool  # the layer saves its high-precision input
    input_first: float  # bytes per input element, the first layer reading a tensor
    input_more: float  # bytes per input element, each further layer reading it
    weight_saved: float  # bytes per weight element saved until backward (not the cache)
    weight_cache: float  # bytes per weight element kept across micro-batches


def storages(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `t`'s data: a QuantizedOperand's codes, transposed codes
    and scales; a view's base."""
    if isinstance(t, QuantizedOperand):
        o = t.op
        parts = (o.values, o.scale, o.gscale, o.values_t, o.scale_t, o.exponent)
        return [b for p in parts if p is not None for b in storages(p)]
    return [t._base if t._base is not None else t]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Pair(nn.Module):
    def __init__(self, recipe, backend, dtype):
        super().__init__()
        self.a = nn.Linear(WIDTH, WIDTH, bias=False, dtype=dtype)
        self.b = nn.Linear(WIDTH, WIDTH, bias=False, dtype=dtype)
        lpnn.convert(self, recipe, skip=(), backend="emulated", log_fn=lambda _: None)
        for _, layer in lpnn.quantized_layers(self):
            layer.backend = backend


def _saved_by_each(pair: _Pair, x: torch.Tensor):
    """(the storages each layer adds to what is saved, by id; whether x itself is saved; the
    outputs)."""
    params = {id(p) for p in pair.parameters()}
    seen: set[int] = set()
    kept_x = [False]
    added: list[dict[int, torch.Tensor]] = []

    def pack(t):
        for s in storages(t):
            if s is x:
                kept_x[0] = True
            elif id(s) not in params and id(s) not in seen:
                seen.add(id(s))
                added[-1][id(s)] = s
        return t

    outs = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in (pair.a, pair.b):
            added.append({})
            outs.append(layer(x))
    return added, kept_x[0], outs


def _cached(backend) -> dict[int, torch.Tensor]:
    """The storages of the backend's weight cache, by id (the Triton backend's; none else)."""
    cached = getattr(backend, "cached_operands", lambda: [])()
    return {id(s): s for op in cached for s in storages(QuantizedOperand(op))}


def measure(recipe, backend, dtype: torch.dtype, device: str = "cpu") -> Kept:
    """A converted layer's `Kept` profile for `recipe` on `backend` (see the module docstring)."""
    if hasattr(backend, "cache_weights"):
        backend.cache_weights = True  # as the trainer runs it
    torch.manual_seed(0)
    pair = _Pair(recipe, backend, dtype).to(device).train()
    rows = []
    for t in TOKENS:
        x = torch.randn(t, WIDTH, dtype=dtype, device=device, requires_grad=True)
        added, keeps_input, outs = _saved_by_each(pair, x)
        cached = _cached(backend)  # a saved copy that is the cached one counts as the cache
        rows.append([sum(nbytes(s) for i, s in a.items() if i not in cached) for a in added])
    del outs
    # A step's backward caches its own weight copies too. Run outside the hooks: under them,
    # backward gets an alias of the weight, not the Parameter the cache is keyed by.
    x = torch.randn(TOKENS[0], WIDTH, dtype=dtype, device=device, requires_grad=True)
    sum(layer(x).float().square().sum() for layer in (pair.a, pair.b)).backward()
    span = (TOKENS[1] - TOKENS[0]) * WIDTH
    first = (rows[1][0] - rows[0][0]) / span
    more = (rows[1][1] - rows[0][1]) / span
    fixed = rows[1][0] - first * TOKENS[1] * WIDTH  # what does not grow with tokens: the weight's
    cache = sum(nbytes(s) for s in _cached(backend).values()) / (2 * WIDTH * WIDTH)
    per_weight = round(fixed / (WIDTH * WIDTH), 4)
    return Kept(backend.name, keeps_input, first, more, per_weight, round(cache, 4))


@functools.lru_cache(maxsize=16)  # one measurement per recipe and backend per process
def profile(recipe, backend: str, dtype: torch.dtype) -> tuple[Kept, str]:
    """(the profile of the backend `backend:` runs on a GPU, how it was measured). auto and
    triton: the Triton backend (auto picks it on a GPU whose self-test passes); emulated: the
    reference."""
    if backend == "emulated":
        return measure(recipe, EmulatedBackend(), dtype), "emulated backend, measured on CPU"
    try:
        import triton  # optional dependency (the gpu extra)
    except ImportError:
        kept = measure(recipe, EmulatedBackend(), dtype)
        return kept, "Triton not installed here: the emulated backend's copies (FP32: more)"
    # optional dependency: the Triton backend imports triton at its top
    from lptrain.nn.backends.triton import TritonBackend

    why = TritonBackend().supports(recipe)
    if why and backend == "triton":  # `lptrain train` would refuse it the same way
        raise ConfigError("precision.backend", f"triton cannot run recipe {recipe.name!r}: {why}")
    if why:
        return measure(recipe, EmulatedBackend(), dtype), f"auto runs emulated (triton: {why})"
    if torch.cuda.is_available():
        return measure(recipe, TritonBackend(), dtype, "cuda"), "Triton backend, measured on GPU"
    if triton.knobs.runtime.interpret:
        return measure(recipe, TritonBackend(), dtype), "Triton backend, interpreter"
    return _in_child(recipe, dtype), "Triton backend, measured under its CPU interpreter"


def _in_child(recipe, dtype: torch.dtype) -> Kept:
    """`measure` with the Triton backend in a child process that imports Triton with its
    interpreter on. The recipe goes over stdin as its JSON form (Recipe.to_dict)."""
    code = (
        "import sys, json, dataclasses, numpy, torch\n"
        "from lptrain.distributed.kept import measure\n"
        "from lptrain.nn.backends.triton import TritonBackend\n"
        "from lptrain.recipes import from_dict\n"
        "spec = json.load(sys.stdin)\n"
        "recipe, dtype = from_dict(spec['recipe']), getattr(torch, spec['dtype'])\n"
        "with numpy.errstate(all='ignore'):\n"
        "    kept = measure(recipe, TritonBackend(), dtype)\n"
        "print(json.dumps(dataclasses.asdict(kept)))\n"
    )
    spec = json.dumps({"recipe": recipe.to_dict(), "dtype": str(dtype).removeprefix("torch.")})
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], input=spec.encode(),
        capture_output=True, env=env, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"measuring the Triton backend failed: {out.stderr.decode()[-2000:]}")
    return Kept(**json.loads(out.stdout.decode().strip().splitlines()[-1]))
