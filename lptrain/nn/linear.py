"""`lptrain.nn.Linear`: a drop-in nn.Linear whose three GEMMs run as its recipe says.

All three GEMMs are written as C = A . B^T with both operands quantized along their last axis
(the GEMM's reduction axis), so one helper serves them all:

    output      Y  = X  . W^T     A = X   (T, K)   B = W   (N, K)   reduction K
    grad_input  dX = dY . W       A = dY  (T, N)   B = W^T (K, N)   reduction N
    grad_weight dW = dY^T . X     A = dY^T (N, T)  B = X^T (K, T)   reduction T

The emulated backend fake-quantizes both operands (lptrain.numerics, FP32 math) and multiplies
in FP32: it is the reference any GPU backend must match. Bias and accumulation stay in high
precision.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lptrain.nn.backend import resolve_backend
from lptrain.nn.recipe import GEMMS, Recipe
from lptrain.nn.recipes import resolve
from lptrain.numerics import (
    TE_NVFP4_SIGNS,
    QuantSpec,
    ScalingState,
    dfp_matmul,
    dfp_quantize,
    fake_quantize,
    hadamard,
    random_signs,
)


def _stateful(spec: QuantSpec | None) -> bool:
    return spec is not None and (spec.scaling == "delayed" or spec.amax_refresh > 1)


class QuantizerState(nn.Module):
    """FP32 buffers of one operand's scaling state (delayed history, held reference).

    Kept in FP32 when the model is cast to bf16 (TE does the same): `_apply` moves these
    buffers between devices but never changes their dtype.
    """

    def __init__(self, history_len: int):
        super().__init__()
        self.register_buffer("amax_history", torch.zeros(history_len, dtype=torch.float32))
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("ref", torch.zeros((), dtype=torch.float32))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def _apply(self, fn, recurse=True):
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A checkpoint without any of our keys (a plain nn.Linear one): start fresh, not fail.
        if not any(k.startswith(prefix) for k in state_dict):
            missing_keys[:] = [k for k in missing_keys if not k.startswith(prefix)]

    def view(self) -> ScalingState:
        return ScalingState.from_buffers(self.amax_history, self.scale, self.ref, self.calls)


# Backward operands that may reuse an earlier GEMM's quantized copy: (gemm, operand, source).
_REUSABLE = (
    ("grad_input", "weight", "output"),
    ("grad_weight", "input", "output"),
    ("grad_weight", "grad_output", "grad_input"),
)


def _axis_free(spec: QuantSpec | None) -> bool:
    """Quantization that does not depend on the axis it runs along: a transpose of the
    quantized tensor equals quantizing the transpose (RNE, no rotation, and scales that see
    the same elements either way). Per-tensor scaling qualifies (delayed too: a second history
    fed the same amaxes gives the same scales), and so do square tiles such as fp8-block's
    128x128 or nvfp4's 16x16 weight tiles: a transposed tile holds the same elements, and
    both roles pad rows and reduction axis to the same tile multiple."""
    if spec is None or spec.hadamard is not None or spec.rounding != "nearest":
        return False
    square_tile = spec.tile is not None and spec.tile[0] == spec.tile[1]
    return spec.scaling in ("none", "tensor", "delayed") or square_tile


def _aliases(recipe: Recipe) -> dict[tuple[str, str], str]:
    """{(gemm, operand): source gemm} where the backward can reuse a quantized copy bit-exactly
    instead of quantizing again (TE and torchao reuse their FP8 copies the same way)."""
    if recipe.backward_operands == "reuse":
        return {}
    out = {}
    for gemm, op, src in _REUSABLE:
        spec = recipe.spec(gemm, op)
        same_acc = recipe.gemm(gemm).accumulate == recipe.gemm(src).accumulate == "fp32"
        if same_acc and _axis_free(spec) and spec == recipe.spec(src, op):
            out[(gemm, op)] = src
    return out


def _lcm(*ns: int) -> int:
    out = 1
    for n in ns:
        out = out * n // math.gcd(out, n)
    return out


def _granularity(spec: QuantSpec | None) -> tuple[int, int]:
    """(row multiple, reduction multiple) an operand needs for its blocks and rotation."""
    if spec is None:
        return 1, 1
    red = spec.hadamard or 1
    rows = 1
    if spec.scaling == "block":
        if spec.tile is not None:
            rows, cols = spec.tile
            red = _lcm(red, cols)
        else:
            red = _lcm(red, spec.block_size)
    return rows, red


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    pr = (-t.shape[0]) % rows
    pc = (-t.shape[1]) % cols
    return F.pad(t, (0, pc, 0, pr)) if pr or pc else t


class Linear(nn.Linear):
    """nn.Linear with a precision recipe. Same constructor and parameters as nn.Linear.

    Extra state in the state_dict: per-operand scaling state (`quant_state.*`), fixed Hadamard
    sign vectors (`signs_*`), a step counter, and the stochastic-rounding generator state
    (`_extra_state`), so a model saved mid-training resumes the same numbers. A plain
    nn.Linear state_dict loads too (quantizer state then starts fresh).
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
        backend: str = "auto",
        seed: int = 0,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = resolve(recipe)
        self.backend, self.backend_reason = resolve_backend(backend)
        self.seed = int(seed)
        self.aliases = _aliases(self.recipe)
        states = {
            f"{g}_{op}": QuantizerState(spec.history_len)
            for g, ops in GEMMS.items()
            for op in ops
            if _stateful(spec := self.recipe.spec(g, op)) and (g, op) not in self.aliases
        }
        # Only recipes with stateful scaling get the submodule (keeps print(model) short).
        self.quant_state = nn.ModuleDict(states) if states else None
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None
        for g in GEMMS:
            if self.recipe.signs != "per_call" and self._needs_signs(g):
                self.register_buffer(f"signs_{g}", self._initial_signs(g))
        self.amax_reduce = None
        self.stats_interval = 0
        self.last_stats: dict[str, dict[str, float]] = {}
        self.dfp_overflows = 0

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_float(
        cls, linear: nn.Linear, recipe: str | Recipe | dict, *, backend: str = "auto", seed: int = 0
    ) -> "Linear":
        """A Linear sharing `linear`'s parameters (same tensors, device and dtype)."""
        with torch.device("meta"):
            new = cls(
                linear.in_features,
                linear.out_features,
                linear.bias is not None,
                recipe=recipe,
                backend=backend,
                seed=seed,
            )
        new.weight = linear.weight
        new.bias = linear.bias
        device = linear.weight.device
        for name, buf in list(new.named_buffers()):
            owner = new.get_submodule(name.rsplit(".", 1)[0]) if "." in name else new
            leaf = name.rsplit(".", 1)[-1]
            owner._buffers[leaf] = _materialize(new, name, buf, device)
        return new

    def _needs_signs(self, gemm: str) -> bool:
        a, b = (self.recipe.spec(gemm, op) for op in GEMMS[gemm])
        return any(s is not None and s.hadamard_signs for s in (a, b))

    def _hadamard_size(self, gemm: str) -> int | None:
        specs = [self.recipe.spec(gemm, op) for op in GEMMS[gemm]]
        return next((s.hadamard for s in specs if s is not None and s.hadamard), None)

    def _initial_signs(self, gemm: str) -> torch.Tensor:
        n = self._hadamard_size(gemm)
        if self.recipe.signs == "te_nvfp4":
            if n != 16:
                raise ValueError(f"recipe {self.recipe.name}: signs 'te_nvfp4' needs hadamard 16")
            return torch.tensor(TE_NVFP4_SIGNS, dtype=torch.float32)
        # Fixed signs: drawn once from a stable per-(seed, gemm) stream, never from hash().
        g = torch.Generator().manual_seed(_stable_seed(self.seed, gemm))
        return random_signs(n, g)

    def _apply(self, fn, recurse=True):
        # Sign vectors stay FP32 like the rest of the quantizer state (model.to(bfloat16)).
        dtypes = {k: b.dtype for k, b in self._buffers.items() if k.startswith("signs_")}
        out = super()._apply(fn, recurse)
        for k, dtype in dtypes.items():
            if self._buffers[k].dtype != dtype:
                self._buffers[k] = self._buffers[k].to(dtype)
        return out

    # -- generator state (stochastic rounding, per-call signs) -----------------------------

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator = None
        self._generator_state = None

    def get_extra_state(self) -> dict[str, Any]:
        state = (
            self._generator.get_state() if self._generator is not None else self._generator_state
        )
        return {"seed": self.seed, "generator": state, "dfp_overflows": self.dfp_overflows}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generator = None
        self._generator_state = state["generator"]
        self.dfp_overflows = int(state.get("dfp_overflows", 0))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # A plain nn.Linear checkpoint has no quantizer state: keep ours fresh.
        quant_keys = [
            k
            for k in missing_keys
            if k.startswith(prefix) and k[len(prefix) :].split(".")[0] in self._quant_key_roots()
        ]
        for k in quant_keys:
            missing_keys.remove(k)

    def _quant_key_roots(self) -> set[str]:
        return {"quant_state", "step", "_extra_state", *(f"signs_{g}" for g in GEMMS)}

    # -- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: expected input with last dim "
                f"{self.in_features}, got shape {tuple(x.shape)}"
            )
        if not self.recipe.quantizes:
            return F.linear(x, self.weight, self.bias)
        return _LinearFunction.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}, backend={self.backend}"

    def collect_stats(self, every: int) -> None:
        """Collect per-operand statistics every `every` training steps (0 turns them off)."""
        self.stats_interval = int(every)

    # -- the GEMM helper shared by the three GEMMs -------------------------------------------

    def _signs(self, gemm: str, device: torch.device) -> torch.Tensor | None:
        if not self._needs_signs(gemm):
            return None
        if self.recipe.signs == "per_call":
            return random_signs(self._hadamard_size(gemm), self.generator(device), device=device)
        return getattr(self, f"signs_{gemm}").to(device)

    def _state(self, gemm: str, op: str) -> ScalingState | None:
        key = f"{self.aliases.get((gemm, op), gemm)}_{op}"
        if self.quant_state is None or key not in self.quant_state:
            return None
        st = self.quant_state[key].view()
        st.amax_reduce = self.amax_reduce
        return st

    def _quant(
        self,
        gemm: str,
        op: str,
        t: torch.Tensor,
        spec: QuantSpec | None,
        signs: torch.Tensor | None,
        want_mask: bool,
        collect: bool,
    ):
        if spec is None:
            return t.float(), None
        out = fake_quantize(
            t,
            spec,
            state=self._state(gemm, op),
            generator=self.generator(t.device),
            signs=signs,
            with_mask=want_mask,
            with_stats=collect,
        )
        if not (want_mask or collect):
            return out, None
        xq, extras = out
        if collect:
            self.last_stats[f"{gemm}.{op}"] = extras["stats"].as_dict()
        return xq, extras.get("mask")

    def gemm(
        self,
        gemm: str,
        a: torch.Tensor,
        b: torch.Tensor,
        *,
        want_mask: bool = False,
        collect: bool = False,
        signs: torch.Tensor | None = None,
        quantized: tuple[bool, bool] = (False, False),
    ):
        """C = A . B^T for one of the three GEMMs, operands quantized per the recipe.

        Returns (C float32, padded fake-quantized operands (qa, qb), masks (ma, mb)). The
        reduction axis is zero-padded to the operands' block/rotation multiple (zeros add
        nothing to the GEMM and do not change amaxes; MX pads short blocks the same way).
        `quantized` marks operands that are already fake-quantized (a reused copy).
        """
        gr = self.recipe.gemm(gemm)
        op_a, op_b = GEMMS[gemm]
        if gr.accumulate == "int32":
            return self._dfp_gemm(gr, a, b), (None, None), (None, None)
        ra, ka = _granularity(gr.a)
        rb, kb = _granularity(gr.b)
        k = _lcm(ka, kb)
        pa, pb = _pad_to(a, ra, k), _pad_to(b, rb, k)
        if signs is None:
            signs = self._signs(gemm, a.device)
        spec_a = None if quantized[0] else gr.a
        spec_b = None if quantized[1] else gr.b
        qa, ma = self._quant(gemm, op_a, pa, spec_a, signs, want_mask, collect)
        qb, mb = self._quant(gemm, op_b, pb, spec_b, signs, want_mask, collect)
        c = qa @ qb.T
        m, n = a.shape[0], b.shape[0]
        crop = (
            (lambda t: t[:m] if t is not None else None),
            (lambda t: t[:n] if t is not None else None),
        )
        return c[:m, :n], (crop[0](qa), crop[1](qb)), (crop[0](ma), crop[1](mb))

    def _dfp_gemm(self, gr, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        gen = self.generator(a.device)
        da = dfp_quantize(a, bits=gr.a.fmt.bits, rounding=gr.a.rounding, generator=gen)
        db = dfp_quantize(b, bits=gr.b.fmt.bits, rounding=gr.b.rounding, generator=gen)
        res = dfp_matmul(da, db, chunk=gr.chunk)
        self.dfp_overflows += res.overflows
        return res.out

    def _collect_now(self) -> bool:
        return self.stats_interval > 0 and int(self.step) % self.stats_interval == 0


def _stable_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _materialize(module: nn.Module, name: str, meta: torch.Tensor, device) -> torch.Tensor:
    """Rebuild a meta buffer on `device` with its initial value."""
    if name.startswith("signs_"):
        return module._initial_signs(name.removeprefix("signs_")).to(device)
    if name.endswith(".scale"):
        return torch.ones((), dtype=meta.dtype, device=device)
    return torch.zeros(meta.shape, dtype=meta.dtype, device=device)


class _LinearFunction(torch.autograd.Function):
    """The three GEMMs of one Linear. Saves X (or its forward-quantized copy in 'reuse' mode)
    and the weight Parameter itself (ZeRO-3 re-gathers it for backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: Linear):
        recipe = layer.recipe
        device_type = x.device.type
        out_dtype = (
            torch.get_autocast_dtype(device_type)
            if torch.is_autocast_enabled(device_type)
            else x.dtype
        )
        collect = layer._collect_now()
        if layer.training:
            layer.step += 1
        with torch.autocast(device_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            fwd_signs = layer._signs("output", x.device)
            y, (xq, wq), (mx, mw) = layer.gemm(
                "output", x2, weight, want_mask=recipe.trust_mask, collect=collect, signs=fwd_signs
            )
            if bias is not None:
                y = y + bias.float()
        # What backward needs: the high-precision operands, or quantized copies it reuses
        # ('reuse' mode: the padded, rotated forward values; aliases: the plain copies).
        k = x2.shape[1]
        if recipe.backward_operands == "reuse":
            saved = (None, None, xq, wq)
        else:
            x_alias = ("grad_weight", "input") in layer.aliases
            w_alias = ("grad_input", "weight") in layer.aliases
            saved = (
                None if x_alias else x,
                None if w_alias else weight,
                xq[:, :k] if x_alias else None,
                wq[:, :k] if w_alias else None,
            )
        ctx.layer = layer
        ctx.fwd_signs = fwd_signs
        ctx.shapes = (x.shape, x2.shape)
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.collect = collect
        ctx.save_for_backward(*saved, mx, mw)
        ctx.has_bias = bias is not None
        return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        layer: Linear = ctx.layer
        recipe = layer.recipe
        x, weight, xq, wq, mx, mw = ctx.saved_tensors
        x_shape, (t, k) = ctx.shapes
        reuse = recipe.backward_operands == "reuse"
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1])
            w_b = wq if wq is not None else weight
            x_b = xq if xq is not None else x.reshape(t, k)
            dx = dw = dyq = None
            if ctx.needs_input_grad[0]:
                dx, (dyq, _), _ = layer.gemm(
                    "grad_input",
                    dy2,
                    w_b.T,
                    collect=ctx.collect,
                    quantized=(False, wq is not None and not reuse),
                )
                dx = _fwd_domain_grad(layer, dx, mx, ctx.fwd_signs, reuse, k)
            if ctx.needs_input_grad[1]:
                if recipe.wgrad_high_precision or not recipe.grad_weight.quantized:
                    dw = dy2.T.float() @ x_b.float()
                else:
                    dy_alias = dyq is not None and ("grad_weight", "grad_output") in layer.aliases
                    a = dyq[:, : dy2.shape[1]].T if dy_alias else dy2.T
                    dw, _, _ = layer.gemm(
                        "grad_weight",
                        a,
                        x_b.T,
                        collect=ctx.collect,
                        quantized=(dy_alias, xq is not None and not reuse),
                    )
                dw = _fwd_domain_grad(layer, dw, mw, ctx.fwd_signs, reuse, k)
            db = dy2.float().sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        x_dtype, w_dtype = ctx.dtypes
        dx = dx.to(x_dtype).reshape(x_shape) if dx is not None else None
        dw = dw.to(w_dtype) if dw is not None else None
        db = db.to(dy.dtype) if db is not None else None
        return dx, dw, db, None


def _fwd_domain_grad(layer: Linear, g: torch.Tensor, mask, signs, reuse: bool, k: int):
    """Map a gradient w.r.t. a GEMM operand back through the forward quantizer's STE.

    In 'reuse' mode g is w.r.t. the forward-quantized (rotated, padded) operand: apply the
    trust mask there, rotate back, crop. In 'requantize' mode g is already w.r.t. the
    high-precision operand; a trust mask is applied in the forward's rotated domain.
    """
    n = layer._hadamard_size("output")
    if not reuse and mask is None:
        return g
    if not reuse:  # trust mask in requantize mode: into the rotated, padded domain first
        g = F.pad(g, (0, mask.shape[1] - g.shape[1]))
        if n:
            g = hadamard(g, n, dim=-1, signs=signs)
    if mask is not None:
        g = g * mask[: g.shape[0]]
    if n:
        g = hadamard(g, n, dim=-1, signs=signs, inverse=True)
    return g[:, :k]
