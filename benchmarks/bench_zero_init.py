"""Peak host memory per rank while building a model with 2 ranks (CPU, gloo), with and without
`deepspeed.zero.Init` (distributed/engine.py `model_construction`): the 125M and 1B recipes with
ZeRO-3, built and converted exactly as `lptrain train` builds them, up to (not including)
`deepspeed.initialize`, whose fp32 optimizer partitions are the same either way.

Each rank reports its peak resident set (`ru_maxrss`) before building (imports, process group)
and after; the table shows the growth. Prints a markdown table.

    python benchmarks/bench_zero_init.py [--models 125m,1b]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from machine import cpu_model

RECIPES = {"125m": "gpu-125m-fp8.yaml", "1b": "gpu-1b-fp8.yaml"}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rank(rank: int, port: int, model: str, zero_init: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    import deepspeed

    from lptrain.cli import recipe_files
    from lptrain.config.schema import load
    from lptrain.distributed import engine
    from lptrain.models import converters
    from lptrain.models.decoder import build_model, count_params

    engine._skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    path = dict(recipe_files())[f"recipes/pretrain/{RECIPES[model]}"]
    cfg = load(path, ["deepspeed.zero_stage=3", "deepspeed.micro_batch=1", "deepspeed.grad_accum=1",
                      "precision.backend=emulated"])  # fmt: skip
    ds = engine.deepspeed_config(cfg, 2)
    convs = converters.build(cfg)
    before, t0 = _peak_mib(), time.perf_counter()
    torch.manual_seed(0)
    net = build_model(cfg.model, 256, cfg.data.block_size, engine.model_construction(ds, zero_init))
    ctx = converters.ConvertContext(0, rank, 2, lambda _: None)
    net = converters.apply(net, convs, ctx)
    seconds = time.perf_counter() - t0
    row = {"before": before, "after": _peak_mib(), "s": seconds, "params": count_params(net)}
    Path(out, f"{model}-{zero_init}-{rank}.json").write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="125m,1b")
    models = ap.parse_args().models.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for model in models:
            for zero_init in (False, True):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                mp.spawn(_rank, args=(port, model, zero_init, out), nprocs=2)
                r = [json.loads(Path(out, f"{model}-{zero_init}-{k}.json").read_text())
                     for k in (0, 1)]  # fmt: skip
                rows.append((model, zero_init, r))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"{datetime.date.today()}")  # fmt: skip
    print("\n| model | params | zero.Init | peak RSS rank 0 (MiB) | rank 1 | growth while "
          "building, rank 0 | build s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = {}
    for model, zero_init, r in rows:
        growth = r[0]["after"] - r[0]["before"]
        base.setdefault(model, growth)
        ratio = "" if not zero_init else f" ({growth / base[model]:.2f}x)"
        print(f"| {model} | {r[0]['params'] / 1e6:.0f}M | {'yes' if zero_init else 'no'} | "
              f"{r[0]['after']:.0f} | {r[1]['after']:.0f} | {growth:.0f}{ratio} | "
              f"{r[0]['s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
