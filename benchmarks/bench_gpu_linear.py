"""fwd+bwd time of one linear layer on a GPU: every lptrain recipe on the triton backend (and
the emulated one at the first shape), against BF16 nn.Linear and, where installed, torchao's
Float8Linear and TransformerEngine's Linear, all measured in the same run; prints a markdown
table for BENCHMARKS.md.

usage: python benchmarks/bench_gpu_linear.py [--shapes 4096x4096x4096,8192x8192x8192,...]
       [--recipes fp8-current,...] [--iters 5]

A shape is tokens x in_features x out_features. Parameters and activations are BF16 (a model
trained under DeepSpeed bf16); each timing is the median of `--iters` fwd+bwd calls after
warm-up calls (Triton compilation, cuBLAS heuristics, the triton backend's self-test), with
CUDA events; one table per shape, printed as soon as the shape is done. torchao's rows run
under torch.compile (as its docs prescribe) and, to keep benchmarks/gpu.sh under 8 minutes,
only at 8192^3. Targets (issue 14): FP8 >= 1.3x BF16 at 8192^3 and at least as fast as torchao
and TE there.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from typing import Callable

import torch
from torch import nn

from lptrain import recipes
from lptrain.nn import Linear

SHAPES = "4096x4096x4096,8192x8192x8192,16384x8192x8192"
TARGET = (8192, 8192, 8192)  # the target shape; torchao (compiled) runs here only


def median_ms(step: Callable[[], object], iters: int, warmup: int = 2) -> float:
    """Median CUDA-event time of `step` in ms (also bench_gpu_quick.py's timer)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step():
        layer.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        layer(xx).backward(dy)

    return step


def _candidates(recipe_names: list[str], first: bool, torchao: bool):
    """(row label, factory(in, out) -> module) for every layer this run measures."""
    out = [("bf16 nn.Linear", lambda i, o: nn.Linear(i, o, bias=False))]
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        for name in ("tensorwise", "rowwise") if torchao else ():
            cfg = Float8LinearConfig.from_recipe_name(name)
            out.append((f"torchao Float8Linear {name}", _torchao(cfg, convert_to_float8_training)))
    except ImportError:
        print("torchao not installed: no torchao rows", file=sys.stderr)
    te_ok = _has_te()
    for name in recipe_names:
        out.append((f"{name} triton", _lptrain(name, "triton")))
        if first:
            out.append((f"{name} emulated", _lptrain(name, "emulated")))
        if te_ok and _te_maps(name):
            out.append((f"{name} te", _te(name)))
    return out


def _torchao(cfg, convert):
    def make(i, o):  # compiled, as torchao prescribes (its eager casts are not its speed)
        return torch.compile(convert(nn.Sequential(nn.Linear(i, o, bias=False)), config=cfg))

    return make


def _lptrain(name: str, backend: str):
    return lambda i, o: Linear(i, o, bias=False, recipe=name, backend=backend, device="cuda")


def _has_te() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        print("TransformerEngine not installed: no te rows", file=sys.stderr)
        return False
    return True


def _te_maps(name: str) -> bool:
    from lptrain.nn.backends.te_mapping import TEUnsupported, te_mapping

    try:
        te_mapping(recipes.get(name))
    except TEUnsupported:
        return False
    return True


def _te(name: str):
    def make(i, o):
        import lptrain

        return lptrain.convert(nn.Sequential(nn.Linear(i, o, bias=False)), name, backend="te")

    return make


def measure(shape: tuple[int, int, int], rows, iters: int) -> dict[str, float | str]:
    t, i, o = shape
    x = torch.randn(t, i, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(t, o, device="cuda", dtype=torch.bfloat16)
    out: dict[str, float | str] = {}
    for label, make in rows:
        try:
            layer = make(i, o).to(device="cuda", dtype=torch.bfloat16)
            out[label] = median_ms(_fwd_bwd(layer, x, dy), iters)
        except Exception as exc:  # one failing row must not lose the others
            out[label] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        print(f"{shape} {label}: {out[label]}", file=sys.stderr)
        torch.cuda.empty_cache()
    return out


def table(shape: tuple[int, int, int], result: dict[str, float | str], iters: int) -> str:
    t, i, o = shape
    p = torch.cuda.get_device_properties(0)
    base = result["bf16 nn.Linear"]
    lines = [
        f"### One linear layer {t}x{i}x{o}, fwd+bwd ({datetime.date.today().isoformat()})",
        "",
        f"GPU: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB), torch "
        f"{torch.__version__}; tokens x in x out = {t} x {i} x {o}; BF16 parameters and "
        f"activations; median of {iters} calls.",
        "",
        "| layer | ms | vs bf16 |",
        "| --- | ---: | ---: |",
    ]
    for label, v in result.items():
        if isinstance(v, float) and isinstance(base, float):
            lines.append(f"| {label} | {v:.2f} | {base / v:.2f}x |")
        else:
            lines.append(f"| {label} | {v} | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES)
    quantized = [n for n in recipes.names() if recipes.get(n).quantizes]
    ap.add_argument("--recipes", default=",".join(quantized))
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device (this benchmark measures GPU kernels)", file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    names = [n for n in args.recipes.split(",") if n]
    for n, shape in enumerate(shapes):  # one table per shape, printed as soon as it is done
        rows = _candidates(names, first=n == 0, torchao=shape == TARGET)
        print(table(shape, measure(shape, rows, args.iters), args.iters), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
