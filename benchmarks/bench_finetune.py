"""Fine-tuning results table (BENCHMARKS.md): every recipes/finetune/*.yaml on one base.

    python benchmarks/bench_finetune.py [--work DIR] [--base-steps 300] [--steps 200]

1. pretrains the base exactly as the README does (`recipes/pretrain/tiny-fp32.yaml`), on the
   embedded stdlib corpus; 2. fine-tunes it with each recipe on `embedded:pydoc-topics`;
3. exports each run and evaluates the *export* (`lptrain eval EXPORT`): the deployable model's
validation loss. Also the base before fine-tuning. Per run: wall time, peak RSS of the training
process (os.wait4; includes ~0.5 GB of Python/torch/DeepSpeed), and the deterministic peak bytes
of one training step of the same model outside DeepSpeed (lptrain.testing.memory: parameters,
buffers, gradients, AdamW state and every transient), which is what differs between methods.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import cpu_model  # noqa: E402

RECIPES = [
    "lora-bf16base", "qlora-int4", "qlora-nf4", "lora-fp8base", "l4q-4bit", "l4q-3bit", "lsq-w4a8",
]  # fmt: skip
ENV = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def run(cmd: list[str]) -> tuple[str, float, float]:
    """(stdout, seconds, peak RSS MiB) of one lptrain command (os.wait4: this child only)."""
    import tempfile

    t = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lptrain", *cmd], cwd=REPO, env=ENV,
                                stdout=out, stderr=err, text=True)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return stdout, time.monotonic() - t, usage.ru_maxrss / 1024


def eval_json(path: Path, data: str | None = None) -> float:
    cmd = ["eval", str(path), "--json"] + (["--data", data] if data else [])
    out, _, _ = run(cmd)
    return json.loads(out.strip().splitlines()[-1])["loss"]


def step_memory(recipe: Path, base: Path, cache: Path) -> float:
    """Deterministic peak MiB of one training step (micro batch of the recipe)."""
    import torch

    from lptrain.config import schema
    from lptrain.config.inherit import tokenizer_spec
    from lptrain.data import dataset
    from lptrain.models import converters
    from lptrain.models.decoder import build_model
    from lptrain.testing.memory import live_bytes, peak_bytes_during

    cfg = schema.load(recipe, [f"init.from={base}", f"data.cache_dir={cache}"])
    tok = dataset.load_tokenizer(tokenizer_spec(cfg))
    blocks = dataset.load_blocks(cfg.data, tok, True, lambda: None)
    src = dataset.BatchSource(blocks, dataset.split(len(blocks), cfg.data.val_fraction).train, 0)
    batch = src.batch(0, cfg.deepspeed.micro_batch)
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.block_size)
    ctx = converters.ConvertContext(0, 0, 1, lambda m: None, sample=lambda: batch)
    model = converters.apply(model, converters.build(cfg), ctx).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return (live_bytes(model, opt) + peak_bytes_during(step)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/lptrain-bench-finetune")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    work = Path(args.work)
    if work.exists():
        raise SystemExit(f"{work} exists; give another --work")
    cache = work / "cache"
    common = ["--set", f"data.cache_dir={cache}", "--set", "logging.progress=lines"]
    base = work / "base"
    _, t_base, rss_base = run(
        [
            "train",
            "recipes/pretrain/tiny-fp32.yaml",
            "--run-dir",
            str(base),
            "--set",
            f"run.max_steps={args.base_steps}",
            *common,
        ]
    )
    rows = [("base (no fine-tuning)", eval_json(base, "embedded:pydoc-topics"), None,
             None, None, t_base, rss_base, None)]  # fmt: skip
    for name in RECIPES:
        recipe = REPO / "recipes" / "finetune" / f"{name}.yaml"
        run_dir = work / name
        _, secs, rss = run(
            [
                "train",
                str(recipe),
                "--run-dir",
                str(run_dir),
                "--set",
                f"init.from={base}",
                "--set",
                f"run.max_steps={args.steps}",
                *common,
            ]
        )
        trained = eval_json(run_dir)
        out, _, _ = run(["export", str(run_dir)])
        deploy = eval_json(run_dir / "export")
        meta = json.loads((run_dir / "export" / "lptrain_export.json").read_text())
        bpp = [v["bytes_per_param"] for v in meta["layers"].values()]
        mem = step_memory(recipe, base, cache)
        rows.append((name, deploy, trained, sum(bpp) / len(bpp) if bpp else None, mem, secs, rss,
                     sorted(set(meta["fold"].values()))))  # fmt: skip
        print(f"{name}: export {deploy:.4f} trained {trained:.4f} {secs:.0f}s", file=sys.stderr)
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")
    print(f"base: tiny-fp32 {args.base_steps} steps on embedded:stdlib; fine-tune {args.steps} "
          "steps x 16 x 128 tokens on embedded:pydoc-topics, ZeRO-2, 1 process\n")  # fmt: skip
    print(
        "| run | val loss of the export | val loss trained (before export) | stored "
        "bytes/weight (export) | step peak MiB (deterministic) | train time s | "
        "train peak RSS MiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, dep, tr, bpp, mem, secs, rss, _ in rows:
        f = lambda v, s: "-" if v is None else format(v, s)  # noqa: E731
        print(f"| {name} | {dep:.4f} | {f(tr, '.4f')} | {f(bpp, '.3f')} | {f(mem, '.1f')} | "
              f"{secs:.0f} | {rss:.0f} |")  # fmt: skip
    for name, *_, how in rows[1:]:
        print(f"- {name}: {'; '.join(how)}")


if __name__ == "__main__":
    main()
