"""What verifying a checkpoint costs (lptrain/checkpoint/store.py `verify`): the manifest check
(every file's size and SHA-256, which resumes did before issue 22) against the parts added
since: the restricted-unpickler scan of every `.pt` file (lptrain/safeload.py, memory-mapped)
and the config parse. One checkpoint per model size, ZeRO-1 (DeepSpeed's optimizer records
included), trained for one step; each timing is the best of `--repeat` (files in page cache).

    python benchmarks/bench_verify.py [--sizes small,wide] [--repeat 3]
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model

from lptrain import safeload
from lptrain.checkpoint import manifest, store

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "small": ["model.preset=small"],
    "wide": ["model.preset=small", "model.dim=512", "model.n_layers=8", "model.ffn_dim=1536"],
}


def checkpoint(size: str, root: Path) -> Path:
    run = root / size
    sets = [*SIZES[size], "run.max_steps=1", "data.block_size=64", "deepspeed.micro_batch=2",
            "deepspeed.zero_stage=1", "data.path=embedded:pydoc-topics"]  # fmt: skip
    cmd = [sys.executable, "-m", "lptrain", "train", str(REPO / "recipes/pretrain/tiny-fp32.yaml"),
           "--run-dir", str(run), *[a for kv in sets for a in ("--set", kv)]]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    (tag,) = (run / "checkpoints").glob("step*")
    return tag


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,wide")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {cpu_model()}, {datetime.date.today()}")
    print("| model | checkpoint MB | manifest (SHA-256) s | unpickle scan s | verify s | "
          "scan / manifest |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as root:
        for size in args.sizes.split(","):
            tag = checkpoint(size, Path(root))
            mb = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file()) / 1e6
            hashing = best(lambda: manifest.problem(tag), args.repeat)  # noqa: B023
            scan = best(lambda: safeload.problem_in(tag), args.repeat)  # noqa: B023
            full = best(lambda: store.verify(tag.parent, tag.name), args.repeat)  # noqa: B023
            print(f"| {size} | {mb:.1f} | {hashing:.3f} | {scan:.3f} | {full:.3f} | "
                  f"{scan / hashing:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
