"""The Triton backend: the fused quantize kernels of lptrain.kernels, then the fastest GEMM the
quantized operands allow (lptrain/nn/backends/matmul.py). Imported only once chosen: it imports
Triton.

Same numbers as the emulated backend: every operand is quantized bit for bit as the reference
quantizes it (kernels/ tests); the GEMMs agree up to accumulation order within the bound stated
in matmul.py; quantizer state (delayed-scaling histories, sample-and-hold references, `calls`)
is updated by the reference's own functions, from amaxes the kernels return. Two differences,
both by design: stochastic rounding draws counter-based Philox bits keyed by (layer seed, call
index, phase, GEMM, operand) instead of torch.Generator draws, so it is the same rule with a
different stream (reproducible, resumable, identical on every device and tile size); and
per-call statistics (`collect_stats`) and float64 layers run through the emulated backend.

Weights: with `cache_weights` on (the trainer turns it on; `after_step` clears the cache after
every optimizer step), a weight's quantized copies are kept across gradient-accumulation
micro-batches and activation-checkpoint replays while the weight is unchanged (same Parameter,
same version counter). Only stateless round-to-nearest weight quantizers are cached: a
delayed-scaling weight's scale moves with its history, so it is requantized each call.
"""

from __future__ import annotations

import math
import weakref

import torch

from lptrain.kernels import block as block_k
from lptrain.kernels import dfp as dfp_k
from lptrain.kernels import fp8 as fp8_k
from lptrain.kernels.amax import amax_2d
from lptrain.nn.backends import matmul as mm
from lptrain.nn.backends.base import Backend, GemmResult
from lptrain.nn.backends.emulated import EmulatedBackend, granularity, pad_to
from lptrain.nn.backends.operand import FP8, Operand, QuantizedOperand, operand_of, plain
from lptrain.nn.backends.triton_rules import bf16_exact, colwise_dy, recipe_problem
from lptrain.nn.call import derive_seed
from lptrain.nn.recipe import GEMMS
from lptrain.numerics import hadamard, random_signs
from lptrain.numerics.scaling import _delayed, _tensor_ref  # the reference's state updates

_GEMM_ID = {"output": 0, "grad_input": 1, "grad_weight": 2}
_OP_ID = {"input": 0, "weight": 1, "grad_output": 2}


def _signature(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _kernels_run_on(device: torch.device) -> bool:
    """CUDA, or the CPU under Triton's interpreter; elsewhere (a model moved after conversion)
    the reference runs instead."""
    import triton  # optional dependency (the gpu extra)

    return device.type == "cuda" or (device.type == "cpu" and triton.knobs.runtime.interpret)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        self.reference = EmulatedBackend()
        self.cache_weights = False
        self._cache: dict = {}
        self._colwise: dict = {}  # id(call) -> (signature of dY^T, its column-wise Operand)

    def supports(self, recipe) -> str | None:
        return recipe_problem(recipe)

    def after_step(self) -> None:
        self._cache.clear()

    def cached_operands(self) -> list[Operand]:
        """The weight copies kept until `after_step` (what the memory plan counts)."""
        return [entry[1] for entry in self._cache.values()]

    # -- the Backend interface ----------------------------------------------------------------

    def quantize(self, call, gemm, operand, t, spec, *, generator, signs, want_mask=False):
        if (
            spec is None
            or call.collect
            or t.dtype == torch.float64
            or not _kernels_run_on(t.device)
        ):
            return self.reference.quantize(
                call,
                gemm,
                operand,
                plain(t),
                spec,
                generator=generator,
                signs=signs,
                want_mask=want_mask,
            )
        op, mask = self._quantize(
            call, gemm, operand, plain(t), spec, generator, signs, want_mask, False
        )
        return op.dequantize(), mask

    def gemm(
        self, call, gemm, a, b, *, generator, signs, want_mask=False, quantized=(False, False)
    ) -> GemmResult:
        if call.collect or torch.float64 in (a.dtype, b.dtype) or not _kernels_run_on(a.device):
            return self.reference.gemm(
                call,
                gemm,
                plain(a),
                plain(b),
                generator=generator,
                signs=signs,
                want_mask=want_mask,
                quantized=quantized,
            )
        gr = call.recipe.gemm(gemm)
        if gr.accumulate == "int32":
            out = self._dfp_gemm(call, gemm, gr, plain(a), plain(b), generator)
            return GemmResult(out, None, None, None, None)
        (ra, ka), (rb, kb) = granularity(gr.a), granularity(gr.b)
        k = ka * kb // math.gcd(ka, kb)
        ops, masks = [], []
        for t, spec, name, done, rows in (
            (a, gr.a, GEMMS[gemm][0], quantized[0], ra),
            (b, gr.b, GEMMS[gemm][1], quantized[1], rb),
        ):
            if done or spec is None:
                ops.append(operand_of(pad_to(t, rows, k)))
                masks.append(None)
                continue
            if gemm == "grad_weight" and name == "grad_output":
                stashed = self._take_colwise(call, t)
                if stashed is not None:  # written by the grad_input GEMM's pass over dY
                    ops.append(stashed)
                    masks.append(None)
                    continue
            want_t = any(src == gemm and op == name for (_, op), src in call.aliases.items())
            want_t = want_t or (gemm == "grad_input" and name == "grad_output" and colwise_dy(call))
            o, m = self._quantize(
                call,
                gemm,
                name,
                pad_to(plain(t), rows, k),
                spec,
                generator,
                signs,
                want_mask,
                want_t,
            )
            ops.append(o)
            masks.append(m)
        m_rows, n_rows = a.shape[0], b.shape[0]
        out = mm.gemm(ops[0], ops[1])[:m_rows, :n_rows]
        qa, qb = QuantizedOperand(ops[0])[:m_rows], QuantizedOperand(ops[1])[:n_rows]
        crop = lambda x, n: x[:n] if x is not None else None  # noqa: E731
        return GemmResult(out, qa, qb, crop(masks[0], m_rows), crop(masks[1], n_rows))

    # -- quantizing one operand -----------------------------------------------------------------

    def _quantize(self, call, gemm, operand, t, spec, generator, signs, want_mask, want_t):
        """(Operand, trust mask or None) for one operand of one GEMM, updating its state."""
        state, update = call.state(gemm, operand)
        key = self._cache_key(call, gemm, operand, t, spec, state, want_mask, want_t)
        hit = self._cache.get(key) if key is not None else None
        if hit is not None and hit[0]() is not None:
            return hit[1], hit[2]
        if spec.hadamard and signs is None and spec.hadamard_signs:
            signs = random_signs(spec.hadamard, generator, device=t.device)
        seed = None
        if spec.rounding == "stochastic":
            index = 1 + 3 * _GEMM_ID[gemm] + _OP_ID[operand]
            seed = derive_seed(generator.initial_seed(), index, 2)
        op, mask = self.quantize_operand(
            t,
            spec,
            state=state,
            update=update,
            signs=signs,
            seed=seed,
            want_mask=want_mask,
            want_t=want_t,
        )
        if want_t and spec.scaling == "row" and op.values_t is not None:
            # dY's column-wise copy: this call's grad_weight GEMM takes it instead of dY^T
            self._colwise[id(call)] = (_signature(t.T), op.t())
            weakref.finalize(call, self._colwise.pop, id(call), None)
        if key is not None:
            base = t._base if t._base is not None else t
            self._cache[key] = (weakref.ref(base), op, mask)
        return op, mask

    def quantize_operand(
        self,
        t,
        spec,
        *,
        state=None,
        update=False,
        signs=None,
        seed=None,
        want_mask=False,
        want_t=False,
    ):
        """(Operand, trust mask or None) of a 2-D operand along its last axis: what
        fake_quantize(t, spec, state=state, update=update, signs=signs) gives, in low precision.
        `seed` keys stochastic rounding; `want_t` also writes tensorwise FP8's transposed copy."""
        if spec.scaling == "block":
            op, mask = self._block(t, spec, state, update, signs, seed, want_mask)
        else:
            if spec.hadamard:  # tensor / row scaling of a rotated operand: rotate first
                t = hadamard(t.to(torch.float32), spec.hadamard, dim=-1, signs=signs)
                spec = spec.replace(hadamard=None, hadamard_signs=False)
            op, mask = self._scaled(t, spec, state, update, seed, want_mask, want_t)
        if state is not None and update and t.numel():
            state.calls += 1
        return op, mask

    def _scaled(self, t, spec, state, update, seed, want_mask, want_t):
        fmt = spec.fmt
        fp8 = fmt.torch_dtype in FP8
        enc = None
        if spec.scaling == "none":
            enc = torch.ones((), device=t.device)
        elif spec.scaling == "delayed":
            if state is None:
                raise ValueError("scaling='delayed' needs a ScalingState (state=...)")
            if spec.delayed_init == "current" and not bool((state.amax_history > 0).any()):
                # The reference's first call scales by this call's amax: read it first.
                a = amax_2d(t)
                amax = state.reduce(a.tensor) if update else a.tensor
                enc = _delayed(amax, spec, state, update) / spec.headroom
                update = False  # recorded already
            else:
                enc = state.scale.clone() / spec.headroom
        kw = dict(codes=fp8, dense=None if fp8 else torch.float32, seed=seed, mask=want_mask)
        if spec.scaling == "row":
            r = fp8_k.quantize_rowwise(t, spec, colwise=want_t and fp8, **kw)
        else:
            r = fp8_k.quantize_tensorwise(t, spec, enc=enc, transpose=want_t and fp8, **kw)
        if spec.scaling == "delayed":
            if update:  # the scale just used was state.scale: record the amax, update
                _delayed(state.reduce(r.amax), spec, state, True)
            if not fp8 and not bool(torch.isfinite(t).all()):  # no special values: the
                r.dense = torch.full_like(r.dense, float("nan"))  # tensor is one NaN group
        if not fp8:
            return Operand(values=r.dense), r.mask
        codes_t = r.codes_t.view(fmt.torch_dtype) if r.codes_t is not None else None
        op = Operand(
            values=r.codes.view(fmt.torch_dtype),
            scale=r.scales,
            values_t=codes_t,
            scale_t=r.scales_t,
        )
        return op, r.mask

    def _block(self, t, spec, state, update, signs, seed, want_mask):
        ref = None
        if spec.two_level:
            rot_signs = signs if spec.hadamard else None
            amax = amax_2d(t, hadamard=spec.hadamard, signs=rot_signs).tensor
            if state is not None and update:
                amax = state.reduce(amax)
            ref = _tensor_ref(amax, spec, state, update)
        dtype = torch.bfloat16 if bf16_exact(spec) else torch.float32
        r = block_k.quantize_block(
            t,
            spec,
            signs=signs if spec.hadamard else None,
            seed=seed,
            tensor_ref=ref,
            codes=False,
            dense=dtype,
            dense_global=False,
            mask=want_mask,
        )
        return Operand(values=r.dense, gscale=r.global_scale), r.mask

    def _dfp_gemm(self, call, gemm, gr, a, b, generator):
        """The emulated backend's INT16 DFP GEMM (non-finite handling, INT32 chunks, overflow
        rule, statistics) with its operands quantized by the DFP kernel (`_dfp` below)."""
        return EmulatedBackend._dfp_gemm(self, call, gemm, gr, a, b, generator)

    def _dfp(self, call, gemm, op, t, spec, generator, amax):
        del amax  # the kernel reduces the operand in its own first pass
        index = 1 + 3 * _GEMM_ID[gemm] + _OP_ID[op]
        seed = derive_seed(generator.initial_seed(), index, 2)
        return dfp_k.quantize_dfp(t, bits=spec.fmt.bits, rounding=spec.rounding, seed=seed)

    def _take_colwise(self, call, t) -> Operand | None:
        """The column-wise copy of dY that this call's grad_input GEMM wrote, if `t` is dY^T."""
        entry = self._colwise.pop(id(call), None)
        if entry is not None and entry[0] == _signature(t):
            return entry[1]
        return None

    def _cache_key(self, call, gemm, operand, t, spec, state, want_mask, want_t):
        """A key for a weight's quantized copy, or None when it must not be cached."""
        if not self.cache_weights or operand != "weight" or state is not None:
            return None
        if spec.rounding != "nearest" or (spec.hadamard_signs and call.recipe.signs == "per_call"):
            return None
        base = t._base if t._base is not None else t
        if not isinstance(base, torch.nn.Parameter):
            return None
        view = (tuple(t.shape), tuple(t.stride()), t.storage_offset())
        return (gemm, id(base), base._version, view, want_mask, want_t)
