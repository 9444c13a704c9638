"""Shadow statistics: what another recipe's quantizers would record on a layer's operands,
without changing what the layer computes (TE's debug tools log a recipe other than the running
one the same way: "what would MXFP8's underflow be here").

On a call whose context carries `shadows` (a statistics window with `monitor.shadow`), each
shadow recipe quantizes the call's high-precision operands exactly as the emulated backend
would for a layer of that recipe: the same orientation (each GEMM's reduction axis last), the
same zero padding to block and rotation multiples, the same fixed Hadamard signs (drawn from
the layer's seed), and its statistics are recorded as `<recipe>/<gemm>.<operand>`. The
quantized values are dropped. Two things differ from a layer that runs the recipe, and say
so in docs/monitoring.md:

* A shadow keeps no state: delayed scaling and held tensor references act as current scaling
  (a shadow sees only monitored steps, so a history of them would not be the recipe's).
* Stochastic rounding and per-call signs draw from streams of their own (`SHADOW_PHASE`), so
  training's streams are untouched.

The input and weight are quantized in the forward (for all three GEMMs: the backward may keep
only reused or quantized copies), the output gradient in the backward. A replayed forward
(activation checkpointing) records nothing: its first run did.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from lptrain.nn.backends.emulated import granularity, pad_to
from lptrain.nn.call import CallContext, initial_signs
from lptrain.nn.recipe import GEMMS, Recipe
from lptrain.nn.reuse import aliases
from lptrain.numerics import QuantSpec, fake_quantize, random_signs


def unsupported(recipe: Recipe) -> str | None:
    """Why `recipe` cannot be a shadow, or None."""
    if not recipe.quantizes:
        return "quantizes nothing"
    if any(recipe.gemm(g).accumulate == "int32" for g in GEMMS):
        return "accumulates in INT32 (its statistics come from the DFP GEMM itself)"
    if recipe.backward_operands == "reuse":
        return "feeds the forward's quantized values to the backward (backward_operands: reuse)"
    return None


def operands(recipe: Recipe) -> list[tuple[str, str]]:
    """The (gemm, operand) pairs a layer of `recipe` quantizes and records (a reused copy is
    recorded once, under the GEMM that made it)."""
    reused = aliases(recipe)
    out = []
    for gemm, ops in GEMMS.items():
        if gemm == "grad_weight" and recipe.wgrad_high_precision:
            continue
        out += [(gemm, op) for op in ops if recipe.spec(gemm, op) and (gemm, op) not in reused]
    return out


def stateless(spec: QuantSpec) -> QuantSpec:
    """The spec as a shadow runs it: delayed scaling as current scaling (no history)."""
    return replace(spec, scaling="tensor") if spec.scaling == "delayed" else spec


def _signs(call: CallContext, recipe: Recipe, gemm: str, gen, device):
    if not recipe.needs_signs(gemm):
        return None
    if recipe.signs == "per_call":
        return random_signs(recipe.hadamard(gemm), gen, device=device)
    return initial_signs(recipe, gemm, call.seed, device)


def _record(call: CallContext, recipe: Recipe, gemm: str, operand: str, t: torch.Tensor):
    """Quantize `t` (the operand as the GEMM takes it, reduction axis last) as `recipe` would
    for `gemm` and record its statistics."""
    gr = recipe.gemm(gemm)
    (ra, ka), (rb, kb) = granularity(gr.a), granularity(gr.b)
    rows = ra if operand == GEMMS[gemm][0] else rb
    padded = pad_to(t, rows, math.lcm(ka, kb))  # as EmulatedBackend.gemm pads
    gen = call.shadow_generator(gemm, t.device)
    signs = _signs(call, recipe, gemm, gen, t.device)
    spec = stateless(recipe.spec(gemm, operand))
    _, extras = fake_quantize(
        padded, spec, generator=gen, signs=signs, with_stats=True, wanted=call.wanted
    )
    call.record_shadow(recipe.name, gemm, operand, extras["stats"])


def record_forward(call: CallContext, x2: torch.Tensor, weight: torch.Tensor) -> None:
    """Shadow statistics of the input x2 (T, K) and weight (N, K) in every GEMM."""
    if not call.shadows or call.recompute:
        return
    oriented = {
        ("output", "input"): lambda: x2,
        ("output", "weight"): lambda: weight,
        ("grad_input", "weight"): lambda: weight.T,  # (K, N): reduction over N
        ("grad_weight", "input"): lambda: x2.T,  # (K, T): reduction over tokens
    }
    _record_all(call, oriented)


def record_backward(call: CallContext, dy2: torch.Tensor) -> None:
    """Shadow statistics of the output gradient dy2 (T, N) in the two backward GEMMs."""
    if not call.shadows:
        return
    oriented = {
        ("grad_input", "grad_output"): lambda: dy2,
        ("grad_weight", "grad_output"): lambda: dy2.T,  # (N, T): reduction over tokens
    }
    _record_all(call, oriented)


def _record_all(call: CallContext, oriented: dict) -> None:
    """Each shadow recipe's statistics of the operands it quantizes, from `oriented`:
    (gemm, operand) -> the high-precision tensor, built only when some shadow reads it."""
    with torch.no_grad():
        for recipe in call.shadows:
            for key in operands(recipe):
                if key in oriented:
                    _record(call, recipe, *key, oriented[key]())
