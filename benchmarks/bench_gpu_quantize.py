"""Bandwidth of each quantize kernel (lptrain.kernels) on a GPU against the GPU's measured copy
bandwidth, in the same run; prints a markdown table for BENCHMARKS.md.

usage: python benchmarks/bench_gpu_quantize.py [--size 8192] [--iters 20]

The operand is a size x size BF16 tensor. Effective bandwidth = (bytes of the input read once +
bytes of every output written) / time, so a kernel that needs a separate amax pass (tensorwise
current scaling, rowwise, two-level NVFP4/UE5M3 scales, DFP) shows that pass as lost
bandwidth. The copy baseline is `dst.copy_(src)` of the same BF16 tensor (read + write).
Target (issue 14): >= 80% of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch

from lptrain import recipes
from lptrain.numerics import TE_NVFP4_SIGNS, QuantSpec


def _time(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def _cases(x: torch.Tensor):
    """(name, passes over the input, fn, output bytes) for every kernel configuration."""
    from lptrain.kernels import block, dfp, fp8

    n = x.numel()
    signs = torch.tensor(TE_NVFP4_SIGNS, dtype=torch.float32, device=x.device)
    nv = recipes.get("nvfp4")
    e4m3 = QuantSpec("fp8_e4m3")
    delayed_enc = torch.tensor(2.0, device=x.device)
    blk = lambda spec, **kw: lambda: block.quantize_block(x, spec, **kw)  # noqa: E731
    return [
        ("fp8 tensorwise current + transposed copy", 2,
         lambda: fp8.quantize_tensorwise(x, e4m3, transpose=True), 2 * n),
        ("fp8 tensorwise delayed + transposed copy + amax", 1,
         lambda: fp8.quantize_tensorwise(x, e4m3, enc=delayed_enc, transpose=True), 2 * n),
        ("fp8 rowwise + column-wise copy", 2,
         lambda: fp8.quantize_rowwise(x, QuantSpec("fp8_e4m3", scaling="row", pow2_scale=True),
                                      colwise=True), 2 * n),
        ("fp8-block 1x128 (pow2 FP32 scales)", 1, blk(recipes.get("fp8-block").output.a),
         n + 4 * n // 128),
        ("fp8-block 128x128 weight tiles", 1, blk(recipes.get("fp8-block").output.b),
         n + 4 * n // 128**2),
        ("mxfp8 (E8M0, 1x32)", 1, blk(recipes.get("mxfp8").output.a), n + 4 * n // 32),
        ("mxfp4 gradient (E8M0, SR, 3/4 headroom)", 1,
         blk(recipes.get("mxfp4").grad_input.a, seed=1), n // 2 + 4 * n // 32),
        ("nvfp4 activation (two-level, 1x16)", 2, blk(nv.output.a), n // 2 + 4 * n // 16),
        ("nvfp4 weight (16x16 tiles)", 2, blk(nv.output.b), n // 2 + 4 * n // 256),
        ("nvfp4 wgrad gradient (RHT 16 + SR)", 2, blk(nv.grad_weight.a, signs=signs, seed=1),
         n // 2 + 4 * n // 16),
        ("fp4-ue5m3 (RHT 16, two-level UE5M3)", 2,
         blk(recipes.get("fp4-ue5m3").output.a, signs=signs), n // 2 + 4 * n // 16),
        ("int16 DFP", 2, lambda: dfp.quantize_dfp(x), 2 * n),
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device (this benchmark measures GPU kernels)", file=sys.stderr)
        return 2
    x = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(x)
    in_bytes = x.numel() * x.element_size()
    copy_bw = 2 * in_bytes / _time(lambda: dst.copy_(x), args.iters)
    p = torch.cuda.get_device_properties(0)
    lines = [
        f"### Quantize kernels ({datetime.date.today().isoformat()})",
        "",
        f"GPU: {p.name} (sm_{p.major}{p.minor}), torch {torch.__version__}; a "
        f"{args.size}x{args.size} BF16 operand; copy bandwidth {copy_bw / 1e9:.0f} GB/s; "
        f"median of {args.iters} calls.",
        "",
        "| kernel | passes over the input | time (us) | effective GB/s | vs copy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, passes, fn, out_bytes in _cases(x):
        try:
            t = _time(fn, args.iters)
            bw = (in_bytes + out_bytes) / t
            row = f"| {name} | {passes} | {t * 1e6:.0f} | {bw / 1e9:.0f} | {bw / copy_bw:.0%} |"
        except Exception as exc:
            row = f"| {name} | {passes} | error: {type(exc).__name__}: {str(exc)[:60]} | | |"
        print(row, file=sys.stderr)
        lines.append(row)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
