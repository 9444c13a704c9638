"""Gradient clipping of a bit-switching run (BENCHMARKS.md "Bit switching: the gradient clip").

    python benchmarks/bench_bitswitch_clip.py [--work DIR] [--base-steps 100] [--steps 60]
                                              [--seeds 0 1] [--blocks 32]

The joint step (lptrain/trainer/bitswitch.py) makes one optimizer update per bit-width, and
`optim.grad_clip` clips each update by the norm of *all* its gradients, the quantizer steps'
included; at 2 bits the weight scales' gradient dominates that norm, so the clip shrinks the
whole 2-bit update (weights too). This script compares, on a shortened
`recipes/qat/bitswitch-8642.yaml` (same model, data, lr, ALRS, bits; fewer steps), the clip
modes:

* `global` (what the trainer does: DeepSpeed's `gradient_clipping`): every update clipped by
  its whole gradient norm;
* `separate`: the weights' norm and the quantizer steps' norm each clipped to grad_clip;
* `weights`: only the weights clipped (by their own norm), the quantizer steps not at all.

It trains in a plain PyTorch loop that makes exactly the trainer's updates (AdamW with
lptrain's parameter groups, the run's lr schedule, ALRS, every batch at 8, 6, 4, 2 bits
highest first, one update each; one process, fp32), because DeepSpeed's `gradient_clipping`
(what the trainer uses) has no way to leave a parameter group out of its norm. Prints, per
mode and seed, the validation loss of the model at each bit-width (the training model's eval
forward, which the switched export reproduces bit for bit), the mean clip coefficient applied
to the weights of each pass, and the mean pre-clip norms. `global` is what the trainer does.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import cpu_model  # noqa: E402

from lptrain.config import schema  # noqa: E402
from lptrain.data import dataset  # noqa: E402
from lptrain.distributed import engine as eng  # noqa: E402
from lptrain.export import evaluate, restore  # noqa: E402
from lptrain.qat import bitswitch as bs  # noqa: E402

MODES = ("global", "separate", "weights")
DATA = "data.path=embedded:pydoc-topics"


@dataclass(frozen=True)
class Clipped:
    """One update's gradient norms before the clip, and the factors applied."""

    total: float  # all trainable parameters (what `global` clips by)
    weights: float  # every parameter but the quantizer steps and offsets
    quantizer: float  # the quantizer group (`lptrain_role == "quantizer"`)
    weight_coef: float  # the factor applied to the weights' gradients
    quantizer_coef: float


def _norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    )


def _coef(norm: float, max_norm: float) -> float:
    return min(1.0, max_norm / (norm + 1e-6)) if max_norm > 0 else 1.0  # torch's clip_grad_norm_


@torch.no_grad()
def clip_grads(model: nn.Module, max_norm: float, mode: str) -> Clipped:
    """Clip the gradients in `model`'s `.grad` in place before one update; `mode`:
    global: all by the norm of all (DeepSpeed's `gradient_clipping`); separate: the weights by
    theirs and the quantizer steps by theirs; weights: the weights by theirs, the quantizer
    steps left as they are. A non-finite norm is left alone (the update is skipped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    quant = [p for p in params if getattr(p, "lptrain_role", None) == "quantizer"]
    ids = {id(p) for p in quant}
    weights = [p for p in params if id(p) not in ids]
    nw, nq = _norm(weights), _norm(quant)
    total = math.hypot(nw, nq)
    if mode == "global":
        cw = cq = _coef(total, max_norm)
    else:
        cw, cq = _coef(nw, max_norm), _coef(nq, max_norm) if mode == "separate" else 1.0
    if math.isfinite(total):
        for group, c in ((weights, cw), (quant, cq)):
            for p in group:
                if p.grad is not None and c != 1.0:
                    p.grad.mul_(c)
    return Clipped(total, nw, nq, cw, cq)


def pretrain(work: Path, steps: int) -> Path:
    base = work / "base"
    if not (base / "checkpoints" / "latest").exists():
        cmd = [sys.executable, "-m", "lptrain", "train", "recipes/pretrain/tiny-fp32.yaml",
               "--run-dir", str(base)]  # fmt: skip
        for kv in (DATA, f"data.cache_dir={work / 'cache'}", f"run.max_steps={steps}",
                   "run.eval_interval=0"):  # fmt: skip
            cmd += ["--set", kv]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return base


def finetune(base: Path, work: Path, mode: str, seed: int, a: argparse.Namespace) -> dict:
    steps = a.steps
    cfg = schema.load(REPO / "recipes/qat/bitswitch-8642.yaml",
                      [f"init.from={base}", f"data.cache_dir={work / 'cache'}",
                       f"run.max_steps={steps}", f"run.seed={seed}",
                       f"deepspeed.micro_batch={a.micro}"])  # fmt: skip
    torch.manual_seed(seed)
    opened = restore.open_run(base)
    model, tok = opened.model.train(), opened.tok
    sec = cfg.bitswitch
    bs.prepare(model, bs.BitSwitchConfig(bits=tuple(sec.bits)), skip=tuple(sec.skip))
    data = dataset.load_blocks(cfg.data, tok, True, lambda: None)
    split = dataset.split(len(data), cfg.data.val_fraction)
    src = dataset.BatchSource(data, split.train, seed)
    micro = cfg.deepspeed.micro_batch
    bs.calibrate(model, src.batch(0, micro))
    groups = eng.param_groups(model, cfg.optim.weight_decay)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps)  # fmt: skip
    factor = eng.lr_lambda(cfg, steps)
    mults = bs.alrs_multipliers(sec.bits, sec.alrs_alpha, sec.alrs_stop_bit)
    coefs = {b: [] for b in sec.bits}
    norms = {b: [] for b in sec.bits}
    for step in range(steps):
        batch = src.batch(step * micro, micro)
        for k, b in enumerate(sec.bits):
            bs.set_bits(model, b)
            for g in opt.param_groups:
                scale = mults[k] if g.get("name") == "quantizer" else 1.0
                g["lr"] = cfg.optim.lr * factor(step) * scale
            model(batch).backward()
            r = clip_grads(model, cfg.optim.grad_clip, mode)
            coefs[b].append(r.weight_coef)
            norms[b].append(r.total)
            opt.step()
            opt.zero_grad(set_to_none=True)
    blocks_, rows, _ = evaluate.val_blocks(cfg, tok)
    losses = {}
    for b in sec.bits:
        bs.set_bits(model, b)
        losses[b] = evaluate.mean_loss(model, blocks_, rows, micro, a.blocks)
    return {"loss": losses, "coef": {b: statistics.mean(v) for b, v in coefs.items()},
            "norm": {b: statistics.mean(v) for b, v in norms.items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=str(REPO / "runs" / "bench-bitswitch-clip"))
    ap.add_argument("--base-steps", type=int, default=100)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--blocks", type=int, default=32, help="validation blocks per loss")
    ap.add_argument("--micro", type=int, default=16, help="sequences per batch (recipe: 16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    t0 = time.monotonic()
    base = pretrain(work, a.base_steps)
    results = {}
    for mode in a.modes:
        for seed in a.seeds:
            results[(mode, seed)] = finetune(base, work, mode, seed, a)
            print(f"# {mode} seed {seed}: {results[(mode, seed)]['loss']}", flush=True)
    bits = sorted(next(iter(results.values()))["loss"], reverse=True)
    print(f"\nMachine: {cpu_model()}; {time.strftime('%Y-%m-%d')}; {time.monotonic() - t0:.0f} s")
    print(f"base: tiny fp32 {a.base_steps} steps; bitswitch-8642 fine-tune {a.steps} steps x "
          f"{a.micro} x 128 tokens, seeds {a.seeds}; val loss on {a.blocks} blocks\n")  # fmt: skip
    head = " | ".join(f"{b}-bit loss" for b in bits)
    print(f"| clip | seed | {head} | mean weight clip coef 8/6/4/2 | mean grad norm 8/6/4/2 |")
    print("| --- | ---: |" + " ---: |" * len(bits) + " --- | --- |")
    for (mode, seed), r in results.items():
        losses = " | ".join(f"{r['loss'][b]:.4f}" for b in bits)
        coef = "/".join(f"{r['coef'][b]:.2f}" for b in bits)
        norm = "/".join(f"{r['norm'][b]:.2f}" for b in bits)
        print(f"| {mode} | {seed} | {losses} | {coef} | {norm} |")
    print("\nmean over seeds:\n")
    print(f"| clip | {head} |")
    print("| --- |" + " ---: |" * len(bits))
    for mode in a.modes:
        per = [np.mean([results[(mode, s)]["loss"][b] for s in a.seeds]) for b in bits]
        print(f"| {mode} | " + " | ".join(f"{v:.4f}" for v in per) + " |")


if __name__ == "__main__":
    main()
