"""`CallContext`: everything one call of a Linear needs, fixed before its autograd Function runs.

The Function never reads or writes the module. It gets this frozen context: the recipe and
backend, the call's index (which seeds its random streams), whether it may update quantizer
state, and explicit handles to the state it may update (scaling states, counters, the stats
dict). Two consequences the rules of the house ask for:

* Evaluation (`layer.eval()`) uses the state and never changes it (TE updates amaxes only in
  training).
* A recomputed forward (activation checkpointing: torch's `checkpoint`, reentrant or not, and
  DeepSpeed's) replays the first one bit for bit and updates nothing a second time. Random
  numbers are counter-based, `seed(layer seed, call index, phase)`, so the same index gives the
  same draws. A training call draws a key from torch's global CPU generator, which every
  checkpoint implementation restores before recomputing (that is how dropout masks repeat); a
  forward that runs inside a backward pass with a key the layer has already seen is that call's
  replay, and gets that call's context back, with the scaling state as the first forward saw it.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from lptrain.numerics import TE_NVFP4_SIGNS, QuantStats, ScalingState, random_signs
from lptrain.numerics.state import thaw
from lptrain.numerics.stats import OPTIONAL, merge_stats

if TYPE_CHECKING:
    from lptrain.nn.backends.base import Backend
    from lptrain.nn.recipe import Recipe

PHASES = {"forward": 0, "backward": 1}
# Random streams of shadow recipes (nn/shadow.py): one per GEMM, after the live phases, so a
# shadow draws nothing from the streams training uses.
SHADOW_PHASE = {"output": 2, "grad_input": 3, "grad_weight": 4}
_MASK63 = (1 << 63) - 1


def stable_seed(seed: int, name: str) -> int:
    """A seed for (seed, name) that is the same in every process (never `hash()`, which is
    salted per process)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def derive_seed(seed: int, index: int, phase: int) -> int:
    """splitmix64 of (seed, index, phase): independent streams per call and phase."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + phase) & (2**64 - 1)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> shift)) * mult) & (2**64 - 1)
    return (z ^ (z >> 31)) & _MASK63


@dataclass(frozen=True)
class CallContext:
    recipe: "Recipe"
    backend: "Backend"
    index: int  # the layer's call counter for this call
    seed: int  # the layer's per-rank seed
    training: bool  # may update state (histories, references, counters)
    recompute: bool  # a replayed forward: forward operands use `snapshots`, update nothing
    collect: bool  # record per-operand statistics into `stats`
    aliases: dict  # (gemm, operand) -> source gemm whose quantized copy the backward reuses
    states: dict  # state key -> live ScalingState
    snapshots: dict  # forward state key -> ScalingState as this call first saw it
    signs: dict  # gemm -> fixed sign vector (a buffer) for randomized Hadamards
    stats: dict = field(default_factory=dict)  # the layer's `last_stats`
    # Merge this call's statistics into `stats` (a window of calls: the micro-batches of one
    # optimizer step) instead of replacing them.
    merge_stats: bool = False
    overflows: torch.Tensor | None = None  # the layer's INT32-overflow counter (int64 buffer)
    # Recipes whose statistics are recorded on the same operands without changing what this
    # call computes (monitor.shadow, nn/shadow.py); only inside a statistics window.
    shadows: tuple = ()
    # Gradients on where the layer was called (inside the autograd Function they are always
    # off): whether a backward will follow that keeps operands (nn/shared.py).
    grad_enabled: bool = True
    # The statistics asked for: of the opt-in ones (numerics/stats.py OPTIONAL) only these
    # are computed.
    wanted: tuple = OPTIONAL

    def updates(self, gemm: str) -> bool:
        """Whether quantizing for `gemm` may change state in this call."""
        return self.training and not (self.recompute and gemm == "output")

    def generator(self, phase: str, device: torch.device) -> torch.Generator:
        return self._stream(PHASES[phase], device)

    def shadow_generator(self, gemm: str, device: torch.device) -> torch.Generator:
        """A shadow recipe's stream for `gemm` in this call (never one training draws from)."""
        return self._stream(SHADOW_PHASE[gemm], device)

    def _stream(self, phase: int, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(self.seed, self.index, phase))
        return g

    def state(self, gemm: str, operand: str) -> tuple[ScalingState | None, bool]:
        """(scaling state, update?) for one operand of one GEMM."""
        key = f"{self.aliases.get((gemm, operand), gemm)}_{operand}"
        if key not in self.states:
            return None, False
        if gemm == "output" and self.recompute:
            return thaw(self.snapshots[key]), False
        return self.states[key], self.updates(gemm)

    def signs_for(self, gemm: str, generator: torch.Generator, device) -> torch.Tensor | None:
        if not self.recipe.needs_signs(gemm):
            return None
        if self.recipe.signs == "per_call":
            return random_signs(self.recipe.hadamard(gemm), generator, device=device)
        return self.signs[gemm].to(device)

    def record(self, gemm: str, operand: str, stats: QuantStats | dict) -> None:
        """Keep one operand's statistics. A replayed forward reproduces its first run bit for
        bit, so its statistics are already counted (a merge would count them twice)."""
        if self.recompute and gemm == "output":
            return
        self._keep(f"{gemm}.{operand}", stats)

    def record_shadow(self, recipe: str, gemm: str, operand: str, stats: QuantStats) -> None:
        """Keep a shadow recipe's statistics of one operand as `<recipe>/<gemm>.<operand>` (the
        caller skips replayed forwards)."""
        self._keep(f"{recipe}/{gemm}.{operand}", stats)

    def _keep(self, key: str, stats: QuantStats | dict) -> None:
        new = stats.as_dict() if isinstance(stats, QuantStats) else stats
        old = self.stats.get(key) if self.merge_stats else None
        self.stats[key] = new if old is None else merge_stats(old, new)

    def count_overflows(self, gemm: str, n: int) -> None:
        if self.overflows is not None and n and self.updates(gemm):
            self.overflows.add_(n)


def initial_signs(recipe: "Recipe", gemm: str, seed: int, device=None) -> torch.Tensor:
    """The fixed Hadamard sign vector of `gemm` for a layer of `recipe` with `seed`: TE's NVFP4
    vector, or drawn once from a stable per-(seed, gemm) stream."""
    if recipe.signs == "te_nvfp4":
        if recipe.hadamard(gemm) != 16:
            raise ValueError(f"recipe {recipe.name}: signs 'te_nvfp4' needs hadamard 16")
        return torch.tensor(TE_NVFP4_SIGNS, dtype=torch.float32, device=device)
    g = torch.Generator().manual_seed(stable_seed(int(seed), gemm))
    return random_signs(recipe.hadamard(gemm), g).to(device)


class CallLedger:
    """The contexts of a layer's recent training calls, by key, for replays (bounded)."""

    def __init__(self, size: int = 64):
        self.size = size
        self._calls: OrderedDict[int, CallContext] = OrderedDict()

    def replay(self, key: int) -> CallContext | None:
        """The context of call `key` if this forward is its recomputation, else None."""
        ctx = self._calls.get(key)
        if ctx is None or not in_backward():
            return None
        return replace(ctx, recompute=True)

    def add(self, key: int, ctx: CallContext) -> None:
        self._calls[key] = ctx
        self._calls.move_to_end(key)
        while len(self._calls) > self.size:
            self._calls.popitem(last=False)


def call_key() -> int:
    """One draw from torch's global CPU generator (checkpointing restores it for the replay)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def in_backward() -> bool:
    """True while autograd runs a backward pass: where every checkpoint recomputes."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is None or task_id() != -1
