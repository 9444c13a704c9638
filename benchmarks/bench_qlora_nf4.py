"""QLoRA's NF4 base against lptrain's int4 base (BENCHMARKS.md): storage, error, fine-tuned loss.

    python benchmarks/bench_qlora_nf4.py [--work DIR] [--base RUN_DIR] [--base-steps 300]
                                         [--steps 200] [--formats int4 nf4]

1. the base: `--base` (an lptrain run of recipes/pretrain/tiny-fp32.yaml) or one pretrained
   here as the README does; 2. every linear weight the recipes adapt (all but lm_head) stored
   as each base format: stored bits per weight (codes and scales, all buffers) and the weight
   SQNR against the float weight (float64: 10·log10(Σw² / Σ(w - ŵ)²) over all of them);
3. `recipes/finetune/qlora-int4.yaml` and `qlora-nf4.yaml` on that base, the same settings
   (bench_finetune.py's commands): the validation loss of the trained run and of its export
   (W + BA re-quantized into the base's format), `lptrain eval` on the run's validation split.

`--formats nf4` runs one row: two invocations with the same `--base` may run side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_finetune import eval_json, run  # noqa: E402
from machine import cpu_model  # noqa: E402

FORMATS = {"int4": "qlora-int4", "nf4": "qlora-nf4"}


def storage_and_sqnr(base: Path, fmt: str, group: int = 64) -> tuple[float, float]:
    """(stored bits per weight, weight SQNR dB) of the base's adapted layers stored in `fmt`."""
    import torch

    from lptrain.export import restore
    from lptrain.nn.select import DEFAULT_SKIP
    from lptrain.qat.layers import select, weight_nk
    from lptrain.qat.quantized import QuantizedLinear

    model = restore.open_run(base).model
    bits = params = signal = noise = 0.0
    for _, _, _, layer in select(model, ["*"], list(DEFAULT_SKIP), None):
        w = weight_nk(layer).detach().float()
        q = QuantizedLinear.from_weight(w, fmt, group_size=group)
        bits += 8 * q.bytes_per_param() * w.numel()
        params += w.numel()
        signal += w.double().square().sum().item()
        noise += (w.double() - q.dequantize().double()).square().sum().item()
    return bits / params, 10 * torch.log10(torch.tensor(signal / noise)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/lptrain-bench-nf4")
    ap.add_argument("--base", default=None, help="an existing tiny-fp32 run directory")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists():
        raise SystemExit(f"{work} exists; give another --work")
    cache = work / "cache"
    common = ["--set", f"data.cache_dir={cache}", "--set", "logging.progress=lines"]
    base = Path(args.base) if args.base else work / "base"
    if not args.base:
        run(["train", "recipes/pretrain/tiny-fp32.yaml", "--run-dir", str(base),
             "--set", f"run.max_steps={args.base_steps}", *common])  # fmt: skip
    rows = []
    for fmt in args.formats:
        name = FORMATS[fmt]
        bits, sqnr = storage_and_sqnr(base, fmt)
        run_dir = work / name
        _, secs, _ = run(["train", str(REPO / "recipes" / "finetune" / f"{name}.yaml"),
                          "--run-dir", str(run_dir), "--set", f"init.from={base}",
                          "--set", f"run.max_steps={args.steps}", *common])  # fmt: skip
        trained = eval_json(run_dir)
        run(["export", str(run_dir)])
        deploy = eval_json(run_dir / "export")
        meta = json.loads((run_dir / "export" / "lptrain_export.json").read_text())
        assert all(v["fmt"] == fmt for v in meta["layers"].values()), meta["layers"]
        rows.append((name, bits, sqnr, trained, deploy, secs))
        print(f"{name}: {bits:.3f} bits, {sqnr:.2f} dB, trained {trained:.4f}, "
              f"export {deploy:.4f}, {secs:.0f}s", file=sys.stderr)  # fmt: skip
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    made = f"{args.base_steps} steps, made here" if not args.base else str(base)
    print(f"base: tiny-fp32 ({made}); fine-tune {args.steps} steps x 16 x 128 tokens on "
          "embedded:pydoc-topics, ZeRO-2, 1 process, LoRA r=16 alpha=32, group 64\n")  # fmt: skip
    print("| run | stored bits/weight | weight SQNR dB | val loss trained | val loss of the "
          "export | train time s |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, bits, sqnr, trained, deploy, secs in rows:
        print(f"| {name} | {bits:.3f} | {sqnr:.2f} | {trained:.4f} | {deploy:.4f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
