"""The first answers a lent GPU gives (`benchmarks/gpu.sh --quick`, within 5 minutes): does
every recipe pass the Triton backend's capability self-test on this GPU, which backend does
`backend: auto` pick for each GPU recipe file, and how fast is the FP8 GEMM against BF16.

usage: python benchmarks/bench_gpu_quick.py selftest
       python benchmarks/bench_gpu_quick.py gemm [--size 8192] [--iters 20]

selftest: every named recipe through `resolve('triton', recipe, 'cuda')` (the kernels compile
and run on this GPU, each quantizer bit for bit against the reference, each GEMM within the
accumulation bound), then each recipes/pretrain/gpu-*.yaml's precision through
`resolve('auto', ...)`, as `lptrain train` resolves it. A refusal prints the self-test's reason.

gemm: TFLOP/s of one size^3 GEMM (BF16 inputs; CUDA events, the median of --iters after
warm-up): BF16 `torch.mm`; FP8 E4M3 `torch._scaled_mm` with tensorwise scales, FP32 output
without fast accumulation (the Triton backend's GEMM, lptrain.nn.backends.matmul) and with BF16
output and fast accumulation (TransformerEngine's forward GEMM); and `matmul.gemm` on FP8
operands, the call the backend makes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from bench_gpu_linear import median_ms  # a sibling script (benchmarks/ is on sys.path)

from lptrain import recipes
from lptrain.config.precision import resolve_recipe
from lptrain.config.schema import load
from lptrain.nn.backends import BackendError, resolve
from lptrain.nn.backends import matmul as mm
from lptrain.nn.backends.operand import Operand

REPO = Path(__file__).resolve().parents[1]


def _header() -> str:
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    return f"{name} (sm_{major}{minor}), torch {torch.__version__}"


def selftest() -> int:
    """Markdown tables; exit 1 when a GPU recipe file's `auto` would not pick triton."""
    print(f"### Capability self-test: {_header()}\n")
    print("| recipe | triton backend on this GPU | seconds |\n| --- | --- | --- |")
    for name in recipes.names():
        recipe = recipes.get(name)
        if not recipe.quantizes:
            print(f"| {name} | nothing to quantize | - |")
            continue
        t0 = time.perf_counter()
        try:
            resolve("triton", recipe, "cuda")
            verdict = "passes"
        except BackendError as exc:
            verdict = f"**refused**: {exc.problem}"
        print(f"| {name} | {verdict} | {time.perf_counter() - t0:.1f} |", flush=True)
    print("\n| recipe file | precision | backend: auto picks |\n| --- | --- | --- |")
    bad = 0
    for path in sorted((REPO / "recipes" / "pretrain").glob("gpu-*.yaml")):
        cfg = load(path)
        recipe = resolve_recipe(cfg.precision)
        backend, why = resolve(cfg.precision.backend, recipe, "cuda")
        bad += recipe.quantizes and backend.name != "triton"
        print(f"| {path.name} | {recipe.name} | {why} |", flush=True)
    return 1 if bad else 0


def gemm(size: int, iters: int) -> int:
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(size, size, device="cuda", generator=g).to(torch.bfloat16)  # (M, K)
    b = torch.randn(size, size, device="cuda", generator=g).to(torch.bfloat16)  # (N, K)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    qa, qb = Operand(values=a8, scale=one), Operand(values=b8, scale=one)

    def scaled(out_dtype, fast):
        return lambda: torch._scaled_mm(
            a8, b8.t(), scale_a=one, scale_b=one, out_dtype=out_dtype, use_fast_accum=fast
        )

    rows = [
        ("BF16 torch.mm, BF16 out", lambda: a @ b.t()),
        ("FP8 _scaled_mm, FP32 out (lptrain triton)", scaled(torch.float32, False)),
        ("FP8 _scaled_mm, BF16 out, fast accum (TE fprop)", scaled(torch.bfloat16, True)),
        ("FP8 matmul.gemm (lptrain triton, with its checks)", lambda: mm.gemm(qa, qb)),
    ]
    flops = 2 * size**3
    print(f"### GEMM {size}^3: {_header()}\n")
    print("| GEMM | ms | TFLOP/s | vs BF16 |\n| --- | --- | --- | --- |")
    base = None
    for label, step in rows:
        try:
            ms = median_ms(step, iters, warmup=3)
        except (RuntimeError, TypeError) as exc:  # no FP8 tensor cores (sm < 89), old torch
            print(f"| {label} | - | {str(exc).splitlines()[0][:80]} | - |", flush=True)
            continue
        base = base or ms
        print(f"| {label} | {ms:.3f} | {flops / ms / 1e9:.0f} | {base / ms:.2f}x |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["selftest", "gemm"])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device visible to torch (this checks a GPU)", file=sys.stderr)
        return 2
    return selftest() if args.part == "selftest" else gemm(args.size, args.iters)


if __name__ == "__main__":
    sys.exit(main())
