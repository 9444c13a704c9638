"""Compile every Triton kernel variant lptrain's recipes launch, for real GPU targets, on a
machine without a GPU (Triton ships ptxas). Triton's CPU interpreter, which the tests use,
accepts code the GPU compiler rejects (a non-constexpr global, a reassigned constexpr); this
catches those before a GPU run does.

usage: python scripts/compile_kernels.py [--arch 90,80] [--quick]

The entry points (lptrain.kernels.fp8 / block / dfp) are driven on CPU tensors with the kernel
launches recorded instead of run; each distinct (signature, constexprs) is then compiled with
the options the launcher uses. --quick compiles only the richest variants (two-level scales
with Hadamard, stochastic rounding and packed FP4; FP8 tensorwise with its transposed copy;
rowwise with its column-wise copy). Exit 1 if any variant fails, printing Triton's error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
         torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}  # fmt: skip


class Recorder:
    """Stands in for a JIT kernel: records each launch's signature and constexprs."""

    def __init__(self, fn, seen: dict):
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid):
        def launch(*args, **kw):
            bound = dict(zip(self.fn.arg_names, args, strict=False), **kw)  # positional prefix
            sig, const = {}, {}
            for name, p in zip(self.fn.arg_names, self.fn.params, strict=True):
                v = bound.get(name, p.default)
                if p.is_constexpr:
                    sig[name], const[name] = "constexpr", v
                elif isinstance(v, torch.Tensor):
                    sig[name] = "*" + TYPES[v.dtype]
                else:
                    sig[name] = "i64" if abs(int(v)) >= 2**31 else "i32"
            key = (self.fn.__name__, repr(sorted(sig.items())), repr(sorted(const.items())))
            self.seen[key] = (self.fn, sig, const)
            for v in args[1:]:  # outputs read back as zeros (amax 0, nothing non-finite)
                if isinstance(v, torch.Tensor):
                    v.zero_()

        return launch


def record(quick: bool) -> dict:
    import lptrain.kernels.amax as ka
    import lptrain.kernels.launch as kl
    import lptrain.kernels.quantize as kq
    from lptrain import recipes
    from lptrain.kernels import block, dfp, fp8
    from lptrain.numerics import TE_NVFP4_SIGNS, QuantSpec

    seen: dict = {}
    kl.quantize_kernel = Recorder(kq.quantize_kernel, seen)
    ka._amax_kernel = Recorder(ka._amax_kernel, seen)
    signs = torch.tensor(TE_NVFP4_SIGNS, dtype=torch.float32)
    x = torch.randn(256, 256).to(torch.bfloat16)
    fp8.quantize_tensorwise(x, QuantSpec("fp8_e4m3"), transpose=True)
    fp8.quantize_rowwise(x, QuantSpec("fp8_e4m3", scaling="row", pow2_scale=True), colwise=True)
    if quick:
        block.quantize_block(x, recipes.get("nvfp4").grad_weight.a, signs=signs, seed=1)
        return seen
    fp8.quantize_tensorwise(x, QuantSpec("fp8_e5m2"), enc=torch.tensor(1.0), transpose=True)
    for name in recipes.names():
        r = recipes.get(name)
        for g in ("output", "grad_input", "grad_weight"):
            for s in (r.gemm(g).a, r.gemm(g).b):
                if s is None or s.scaling != "block":
                    continue
                sg = None
                if s.hadamard_signs:
                    sg = signs if s.hadamard == 16 else torch.ones(s.hadamard)
                seed = 1 if s.rounding == "stochastic" else None
                block.quantize_block(x, s, signs=sg, seed=seed)  # codes
                block.quantize_block(
                    x,
                    s,
                    signs=sg,
                    seed=seed,
                    codes=False,  # as the backend
                    dense=torch.bfloat16,
                    dense_global=False,
                    mask=r.trust_mask,
                )
    extra = [  # rules no named recipe uses by default
        QuantSpec("fp4_e2m1", scaling="block", block_size=16, scale_format="ue4m3",
                  scale_rounding="ceil"),
        QuantSpec("fp8_e4m3", scaling="block", block_size=32, scale_format="e8m0",
                  scale_rounding="ceil"),
    ]  # fmt: skip
    for s in extra:
        block.quantize_block(x, s)
    dfp.quantize_dfp(torch.ones(64, 64))
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90,80", help="CUDA compute capabilities, e.g. 90,100")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    seen = record(args.quick)
    fails = 0
    for arch in (int(a) for a in args.arch.split(",")):
        for (name, _, _), (fn, sig, const) in seen.items():
            try:
                triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                               options={"enable_fp_fusion": False})  # fmt: skip
            except Exception as exc:
                fails += 1
                print(f"sm_{arch} {name} {const}:", file=sys.stderr)
                traceback.print_exception(exc, limit=0, chain=True)
    print(f"{len(seen)} kernel variants x {args.arch}: {fails} failed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
