"""Training state per parameter and loss for each optimizer-state configuration (issue 26).

    python benchmarks/bench_optim_states.py               # bytes table + loss study, 3 seeds
    python benchmarks/bench_optim_states.py --moments     # sqrt(v) against COAT's expansion
    python benchmarks/bench_optim_states.py --bytes-only  # the bytes table alone (seconds)

Bytes per parameter come from tensor sizes, not RSS: one training step of the nano model under
`distributed.engine.initialize` (the trainer's own DeepSpeed setup), then the sizes of the
weights, the gradients (taken after backward, before the update clears them), DeepSpeed's fp32
master copy (the bf16 engine's flat fp32 groups) and the optimizer state (every tensor in the
torch optimizer's state but the step count). `lptrain plan` uses the same per-parameter figures
(distributed/memory.py `optimizer_rows`).

The loss is the loss study's setup (lptrain/testing/study.py STUDY: nano, 300 steps of 16 x 128
tokens, lr 3e-3) at seeds 0-2, one thread per run, `--jobs` runs at a time; results are cached
in OUT/results under a hash of the command, as benchmarks/loss_study.py does.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.multiprocessing as mp
from machine import cpu_model

from lptrain.testing.study import BASE_RECIPE, QUIET, STUDY, final_val_loss

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
FP32 = "fp32 Adam (fp32 engine)"  # the reference every gap is taken to

# name -> overrides of the study setup
CONFIGS: dict[str, list[str]] = {
    FP32: [],
    "bf16 engine, fp32 master + moments": ["deepspeed.dtype=bf16", "precision.recipe=bf16"],
    "bf16 engine, saved activations fp8": [
        "deepspeed.dtype=bf16", "precision.recipe=bf16", "precision.saved_activations=fp8"
    ],
    "states bf16": ["optim.states=bf16"],
    "states fp8": ["optim.states=fp8"],
    "states int8-block": ["optim.states=int8-block"],
    "states fp8, master bf16-sr": [
        "optim.states=fp8", "optim.master=bf16-sr", "deepspeed.dtype=bf16"
    ],
    "states int8-block, master bf16-sr": [
        "optim.states=int8-block", "optim.master=bf16-sr", "deepspeed.dtype=bf16"
    ],
    # recipes/pretrain/tiny-fp8-compact.yaml's combination before and after FP8 saved activations,
    # and its fp32-Adam baseline
    "fp8-delayed GEMMs, fp32 Adam": ["precision.recipe=fp8-delayed"],
    "fp8-delayed GEMMs, states fp8, master bf16-sr": [
        "precision.recipe=fp8-delayed", "optim.states=fp8", "optim.master=bf16-sr",
        "deepspeed.dtype=bf16",
    ],
    # ... with FP8 saved activations too: tiny-fp8-compact.yaml since issue 26 item 3
    "fp8-delayed GEMMs, states fp8, master bf16-sr, saved activations fp8": [
        "precision.recipe=fp8-delayed", "optim.states=fp8", "optim.master=bf16-sr",
        "deepspeed.dtype=bf16", "precision.saved_activations=fp8",
    ],
}  # fmt: skip


# ---------------------------------------------------------------- bytes per parameter


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _master_copy(opt) -> list[torch.Tensor]:
    """DeepSpeed's fp32 copy of the weights: the bf16 engine's wrapper (FP16_UnfusedOptimizer
    at ZeRO-0) keeps one per parameter in `fp32_groups`; nothing otherwise."""
    return [p for group in getattr(opt, "fp32_groups", []) for p in group]


def _measure_bytes(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from lptrain.config.schema import load
    from lptrain.distributed import engine
    from lptrain.models.decoder import build_model

    engine._skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    table = {}
    tokens = torch.randint(0, 257, (2, 65), generator=torch.Generator().manual_seed(0))
    for name, overrides in CONFIGS.items():
        cfg = load(REPO / BASE_RECIPE, [*STUDY, *overrides])
        torch.manual_seed(0)
        model = build_model(cfg.model, 257, 64)
        e, _ = engine.initialize(model, cfg, engine.deepspeed_config(cfg, 1), 10)
        e.backward(e(tokens))
        params = list(e.module.parameters())
        n = sum(p.numel() for p in params)
        grads = [p.grad for p in params if p.grad is not None]
        e.step()
        inner = getattr(e.optimizer, "optimizer", e.optimizer)
        moments = [v for s in inner.state.values() for k, v in s.items() if k != "step"]
        table[name] = {
            "params": n,
            "weights": _nbytes(params) / n,
            "grads": _nbytes(grads) / n,
            "master": _nbytes(_master_copy(e.optimizer)) / n,
            "moments": _nbytes(moments) / n,
        }
    Path(out, "bytes.json").write_text(json.dumps(table))


def bytes_table(out: Path) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_measure_bytes, args=(port, str(out)), nprocs=1)
    return json.loads((out / "bytes.json").read_text())


# ---------------------------------------------------------------- loss at 3 seeds


def _run(name: str, seed: int, out: Path, cache_dir: str | None) -> float:
    sets = [*STUDY, *QUIET, *CONFIGS[name], f"run.seed={seed}"]
    sets += [f"data.cache_dir={cache_dir}"] if cache_dir else []
    key = hashlib.sha256(json.dumps(sets).encode()).hexdigest()[:16]
    saved = out / "results" / f"{key}.json"
    if saved.exists():
        return json.loads(saved.read_text())["val_loss"]
    run_dir = out / "runs" / key
    cmd = [
        sys.executable,
        "-m",
        "lptrain",
        "train",
        str(REPO / BASE_RECIPE),
        "--run-dir",
        str(run_dir),
    ]
    cmd += [a for kv in sets for a in ("--set", kv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{name} seed {seed}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res = {
        "name": name,
        "seed": seed,
        "val_loss": final_val_loss(rows),
        "wall": time.monotonic() - t0,
    }
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(res) + "\n")
    return res["val_loss"]


def loss_table(
    out: Path, jobs: int, cache_dir: str | None, only: list[str] | None = None
) -> dict[str, list[float]]:
    names = [n for n in CONFIGS if only is None or n in only or n == FP32]
    runs = [(name, seed) for name in names for seed in SEEDS]
    with ThreadPoolExecutor(jobs) as pool:
        losses = list(pool.map(lambda r: _run(*r, out, cache_dir), runs))
    table: dict[str, list[float]] = {}
    for (name, _), loss in zip(runs, losses, strict=True):
        table.setdefault(name, []).append(loss)
    return table


# ---------------------------------------------------------------- sqrt(v) or COAT expansion


def _real_moments(steps: int = 200) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(m, v) of every matrix of the nano model after `steps` of fp32 AdamW on the corpus."""
    from lptrain.config.schema import load
    from lptrain.models.decoder import build_model

    cfg = load(REPO / BASE_RECIPE, list(STUDY))
    torch.manual_seed(0)
    model = build_model(cfg.model, 257, 128)  # byte tokens of lptrain's own sources
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    text = (REPO / "lptrain").rglob("*.py")
    data = torch.tensor(list(b"".join(p.read_bytes() for p in sorted(text))), dtype=torch.long)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - 130, (16,), generator=g)
        batch = torch.stack([data[s : s + 129] for s in starts.tolist()])
        opt.zero_grad()
        model(batch).backward()
        opt.step()
    return [(s["exp_avg"], s["exp_avg_sq"]) for p, s in opt.state.items() if p.dim() >= 2]


def _bnb_v(v: torch.Tensor) -> torch.Tensor:
    """v through bitsandbytes' 8-bit Adam storage: its unsigned dynamic code, blocks of 256."""
    import bitsandbytes.functional as bnbf  # optional: only this comparison needs it

    q, state = bnbf.quantize_blockwise(v, code=bnbf.create_dynamic_map(signed=False), blocksize=256)
    return bnbf.dequantize_blockwise(q, state)


def moments_table() -> list[tuple[str, float, float, float, float]]:
    """Per stored form of v: median relative error of v, median and 99.9th percentile relative
    error of Adam's update m / sqrt(v), and the fraction of non-zero v stored as 0, over every
    matrix's moments after 200 steps."""
    from lptrain.optim import states as st

    pairs = _real_moments()
    m = torch.cat([p[0].reshape(-1) for p in pairs])
    v = torch.cat([p[1].reshape(-1) for p in pairs])
    e4m3 = dict(element="fp8_e4m3", qmax=448.0)
    codecs = {
        "E4M3 of v": st.Codec(transform="none", **e4m3),
        "E4M3 of sqrt(v)": st.Codec(transform="sqrt", **e4m3),
        "E4M3, COAT expansion to min subnormal 2^-9": st.Codec("fp8_e4m3", "expand", 448.0, 2**-9),
        "E4M3, COAT expansion to min normal 2^-6 (fp8)": st.STATE_FORMATS["fp8"].v,
        "uint8 of v": st.Codec("uint8", "none", 255.0),
        "uint8 of sqrt(v) (int8-block)": st.STATE_FORMATS["int8-block"].v,
    }
    forms = {name: (lambda x, c=c: st.decode(*st.encode(x, c), c)) for name, c in codecs.items()}
    forms["bitsandbytes AdamW8bit's v (dynamic map, block 256)"] = _bnb_v
    rows = []
    nz = v > 0
    upd = m / (v.sqrt() + 1e-8)
    for name, f in forms.items():
        y = f(v)
        rel_v = ((y - v).abs() / v)[nz].median().item()
        rel_u = ((m / (y.sqrt() + 1e-8) - upd).abs() / upd.abs().clamp(min=1e-12))[nz]
        zero = ((y == 0) & nz).float().mean().item()
        sample = rel_u[torch.randperm(rel_u.numel())[:100000]].double()
        rows.append(
            (name, rel_v, rel_u.median().item(), torch.quantile(sample, 0.999).item(), zero)
        )
    return rows


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--moments", action="store_true", help="only the sqrt(v) / COAT comparison")
    ap.add_argument("--bytes-only", action="store_true", help="only the bytes table")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=None, help="configuration names (and fp32)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_optim_states"))
    ap.add_argument("--cache-dir", default=None, help="data.cache_dir of the runs")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{datetime.date.today()}")  # fmt: skip
    if args.moments:
        head = [
            "stored form of v",
            "median rel. error of v",
            "median rel. error of m/sqrt(v)",
            "99.9th percentile, m/sqrt(v)",
            "v > 0 stored as 0",
        ]
        print("\n| " + " | ".join(head) + " |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, rv, ru, tail, z in moments_table():
            print(f"| {name} | {rv:.4f} | {ru:.4f} | {tail:.3g} | {z:.2%} |")
        return
    t0 = time.monotonic()
    sizes = bytes_table(args.out)
    losses = {} if args.bytes_only else loss_table(args.out, args.jobs, args.cache_dir, args.only)
    ref = losses.get(FP32)
    head = ["configuration", "weights", "grads", "master", "moments", "total B/param"]
    head += ["final val loss (mean ± sd, 3 seeds)", "paired gap to fp32"]
    print("\n| " + " | ".join(head) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for name, b in sizes.items():
        total = b["weights"] + b["grads"] + b["master"] + b["moments"]
        parts = [b["weights"], b["grads"], b["master"], b["moments"], total]
        cells = f"| {name} | " + " | ".join(f"{x:.3f}" for x in parts) + " |"
        if name in losses:
            ls = losses[name]
            gaps = [a - r for a, r in zip(ls, ref, strict=True)]
            cells += f" {statistics.mean(ls):.4f} ± {statistics.stdev(ls):.4f} |"
            cells += f" {statistics.mean(gaps):+.4f} ± {statistics.stdev(gaps):.4f} |"
        else:
            cells += " - | - |"
        print(cells)
    if losses:
        print(
            "\nper seed (0, 1, 2): "
            + "; ".join(f"{k}: " + " ".join(f"{x:.4f}" for x in v) for k, v in losses.items())
        )
    print(f"\nthis invocation {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
