"""`lptrain.nn.Linear`: a drop-in nn.Linear whose three GEMMs run as its recipe says.

The module owns the parameters and the quantizer state; `function.py` holds the autograd
Function with the three GEMMs; a backend (`backends/`) quantizes and multiplies. Each call
gets a frozen `CallContext` (`call.py`) so that the Function never mutates the module.

Quantizer state, all tensors in the state_dict (safetensors and `save_pretrained` work):
`quant_state.<gemm>_<operand>.*` (delayed-scaling histories, held references), `signs_<gemm>`
(fixed Hadamard sign vectors), `step` (training calls so far: the counter behind the
counter-based random streams and the statistics interval), `seed` (this layer's random
stream) and `int32_overflows`. `step`, `seed` and `int32_overflows` live on the CPU whatever
the model's device, so reading them never synchronizes with a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lptrain.nn.backends import Backend
from lptrain.nn.backends import resolve as resolve_backend
from lptrain.nn.call import CallContext, CallLedger, call_key, initial_signs
from lptrain.nn.function import LinearFunction
from lptrain.nn.recipe import GEMMS, Recipe
from lptrain.nn.resolve import resolve
from lptrain.nn.reuse import aliases as reuse_aliases
from lptrain.numerics import QuantSpec, ScalingState
from lptrain.numerics.stats import OPTIONAL

_CPU_BUFFERS = ("step", "seed", "int32_overflows")


def _stateful(spec: QuantSpec | None) -> bool:
    return spec is not None and (spec.scaling == "delayed" or spec.amax_refresh > 1)


def default_seed() -> int:
    """A fresh seed from torch's global generator: distinct per layer, reproducible under
    torch.manual_seed (like weight initialization)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


class Linear(nn.Linear):
    """nn.Linear with a precision recipe. Same constructor and parameters as nn.Linear.

    recipe: a name (`lptrain.recipes.names()`), a Recipe, an inline dict or a YAML path.
    backend: auto | emulated | triton | te. seed: this layer's random stream (stochastic
    rounding, random Hadamard signs); None draws one from torch's global generator, so two
    layers never share a stream. A plain nn.Linear state_dict loads too (quantizer state then
    starts fresh).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        recipe: str | Recipe | dict = "fp8-current",
        backend: str | tuple[Backend, str] = "auto",
        seed: int | None = None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = resolve(recipe)
        if isinstance(backend, tuple):  # resolved once per model by convert()
            self.backend, self.backend_reason = backend
        else:
            self.backend, self.backend_reason = resolve_backend(backend, self.recipe, device)
        self.stats_interval = 0
        self.stats_window = False  # see open_stats_window
        self.quantization_enabled = True  # False: plain F.linear (see lptrain.nn.observe)
        self.last_stats: dict[str, dict[str, float]] = {}
        self.shadows: tuple = ()  # shadow recipes of the open statistics window
        self.stats_wanted: tuple = OPTIONAL  # the statistics the open window asks for
        self._ledger = CallLedger()
        self.init_quantizer_state(default_seed() if seed is None else seed, device)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        recipe: str | Recipe | dict,
        *,
        backend: str | tuple[Backend, str] = "auto",
        seed: int | None = None,
    ) -> "Linear":
        """A Linear sharing `linear`'s parameters (same tensors, device and dtype)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",
            recipe=recipe,
            backend=backend,
            seed=seed,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        new.init_quantizer_state(new.seed if seed is None else seed, linear.weight.device)
        new.train(linear.training)
        return new

    def set_recipe(self, recipe: str | Recipe | dict, backend: tuple[Backend, str] | None = None):
        """Switch this layer to another recipe in place (same module, parameters, seed and call
        counter; quantizer state fresh for the new recipe). In place, unlike `convert`'s
        re-recipe, so that hooks others hold on the module (ZeRO-3's gathers) keep working."""
        reduce = getattr(self, "_amax_reduce", None)  # set by lptrain.nn.set_amax_reduce
        self.recipe = resolve(recipe)
        self.backend, self.backend_reason = backend or resolve_backend("auto", self.recipe)
        counters = {k: getattr(self, k).clone() for k in ("step", "int32_overflows")}
        self.init_quantizer_state(int(self.seed), self._state_device())
        for k, v in counters.items():
            getattr(self, k).copy_(v)
        for state in self.quant_state.values() if self.quant_state is not None else ():
            state.amax_reduce = reduce  # the data-parallel MAX-reduction carries over

    def _state_device(self) -> torch.device:
        """Where quantizer state lives: the weight's device, or for a weightless layer (the GEMMs
        of an L4Q or stored-quantized layer) its other buffers'; the counters stay on the CPU."""
        if self.weight is not None:
            return self.weight.device
        kept = [b.device for k, b in self.named_buffers() if k.split(".")[0] not in _CPU_BUFFERS]
        return kept[0] if kept else torch.device("cpu")

    def init_quantizer_state(self, seed: int, device=None) -> None:
        """(Re)build every quantizer buffer at its initial value for the current recipe."""
        cpu = dict(dtype=torch.int64, device="cpu")
        self.register_buffer("step", torch.zeros((), **cpu))
        self.register_buffer("seed", torch.tensor(int(seed), **cpu))
        self.register_buffer("int32_overflows", torch.zeros((), **cpu))
        self.aliases = reuse_aliases(self.recipe)
        states = {
            f"{g}_{op}": ScalingState(spec.history_len, device=device)
            for g, ops in GEMMS.items()
            for op in ops
            if _stateful(spec := self.recipe.spec(g, op)) and (g, op) not in self.aliases
        }
        # Only recipes with stateful scaling get the submodule (keeps print(model) short).
        self.quant_state = nn.ModuleDict(states) if states else None
        for g in GEMMS:
            name = f"signs_{g}"
            if name in self._buffers:
                del self._buffers[name]
            if self.recipe.signs != "per_call" and self.recipe.needs_signs(g):
                self.register_buffer(name, self._initial_signs(g, device))
        self._ledger = CallLedger()
        self.last_stats = {}

    def _initial_signs(self, gemm: str, device) -> torch.Tensor:
        return initial_signs(self.recipe, gemm, int(self.seed), device)

    def _apply(self, fn, recurse=True):
        # Sign vectors stay FP32 like the rest of the quantizer state (model.to(bfloat16));
        # the counters stay on the CPU (reading them must not wait for a GPU).
        keep = {k: b for k, b in self._buffers.items() if k.startswith("signs_")}
        cpu = {k: self._buffers[k] for k in _CPU_BUFFERS if k in self._buffers}
        out = super()._apply(fn, recurse)
        for k, old in keep.items():
            if self._buffers[k].dtype != old.dtype:
                self._buffers[k] = self._buffers[k].to(old.dtype)
        for k, old in cpu.items():
            if self._buffers[k].device.type not in ("cpu", "meta"):
                self._buffers[k] = old
        return out

    def reseed(self, seed: int) -> None:
        self.seed.fill_(int(seed))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A plain nn.Linear checkpoint has no quantizer state: keep ours fresh.
        roots = {"quant_state", *_CPU_BUFFERS, *(f"signs_{g}" for g in GEMMS)}
        for k in [k for k in missing_keys if k.startswith(prefix)]:
            if k[len(prefix) :].split(".")[0] in roots:
                missing_keys.remove(k)

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, self.weight_nk())

    def gemm(self, x: torch.Tensor, weight_nk: torch.Tensor) -> torch.Tensor:
        """This layer's three GEMMs, run as its recipe says, with `weight_nk` (out, in) as the
        weight: QAT and adapters (lptrain.qat, lptrain.lora) hand their own weight here (a
        fake-quantized or dequantized copy) and keep the recipe, its state and its counters."""
        call = self.call_context(x)
        if call is None:
            return F.linear(x, weight_nk, self.bias)
        return LinearFunction.apply(x, weight_nk, self.bias, call)

    def call_context(self, x: torch.Tensor) -> CallContext | None:
        """The context of one call of this layer's quantized GEMMs on `x` (a training call
        advances `step`), or None where `gemm` runs plain math. Public for layers that run
        the GEMMs of nn/function.py themselves (L4Q builds its weight in the Function)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with last dim "
                f"{self.in_features}, got shape {tuple(x.shape)}"
            )
        # No quantization, or no tokens (an empty micro-batch or MoE expert): plain math gives
        # the empty output and zero weight gradients, and no quantizer state is touched.
        if not (self.recipe.quantizes and self.quantization_enabled) or x.numel() == 0:
            return None
        return self._begin_call()

    def weight_nk(self) -> torch.Tensor:
        """The weight as the GEMMs see it: (out_features, in_features)."""
        return self.weight

    def _begin_call(self) -> CallContext:
        """This call's context. Training calls advance `step` once; a replay (activation
        checkpointing) gets its first call's context back instead."""
        if not self.training:
            return self._context(int(self.step), training=False)
        key = call_key()
        replay = self._ledger.replay(key)
        if replay is not None:
            return replay
        ctx = self._context(int(self.step), training=True)
        self.step += 1
        self._ledger.add(key, ctx)
        return ctx

    def _context(self, index: int, training: bool) -> CallContext:
        states = dict(self.quant_state.items()) if self.quant_state is not None else {}
        every = self.stats_interval
        collect = training and (self.stats_window or (every > 0 and index % every == 0))
        if collect and not self.stats_window:
            self.last_stats.clear()
        return CallContext(
            recipe=self.recipe,
            backend=self.backend,
            index=index,
            seed=int(self.seed),
            training=training,
            recompute=False,
            collect=collect,
            aliases=self.aliases,
            states=states,
            snapshots={k: s.snapshot() for k, s in states.items() if k.startswith("output_")}
            if training
            else {},
            signs={g: getattr(self, f"signs_{g}") for g in GEMMS if hasattr(self, f"signs_{g}")},
            stats=self.last_stats,
            merge_stats=self.stats_window,
            overflows=self.int32_overflows,
            shadows=self.shadows if collect and self.stats_window else (),
            wanted=self.stats_wanted if self.stats_window else OPTIONAL,
            grad_enabled=torch.is_grad_enabled(),
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}, backend={self.backend.name}"

    def collect_stats(self, every: int) -> None:
        """Collect per-operand statistics every `every` training steps (0 turns them off)."""
        self.stats_interval = int(every)

    def open_stats_window(self, shadows: tuple = (), wanted: tuple = OPTIONAL) -> None:
        """Collect on every training call from now on and merge the calls' statistics (the
        micro-batches of one optimizer step) into `last_stats`, until `close_stats_window`.
        `shadows`: recipes whose statistics on the same operands are kept too, as
        `<recipe>/<gemm>.<operand>` (nn/shadow.py); what the layer computes does not change.
        `wanted`: the statistic names asked for; opt-in ones not in it are not computed."""
        self.last_stats.clear()
        self.stats_window = True
        self.shadows = tuple(shadows)
        self.stats_wanted = tuple(wanted)

    def close_stats_window(self) -> dict[str, dict[str, float]]:
        self.stats_window = False
        self.shadows = ()
        self.stats_wanted = OPTIONAL
        return dict(self.last_stats)
