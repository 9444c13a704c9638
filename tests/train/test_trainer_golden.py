"""The main job's first 20 losses, bit for bit: any change to the numerics shows up here.

`lptrain train recipes/pretrain/tiny-fp8.yaml` exactly as the README runs it (the schedule spans
its 300 steps), stopped at step 20. The losses are stored as float hex in
tests/golden/tiny-fp8-losses.json. A deliberate numerics change regenerates the file with
`LPTRAIN_UPDATE_GOLDEN=1 python -m pytest tests/train/test_golden.py` and says why in its
commit. The values are CPU fp32 results with one thread (OMP_NUM_THREADS=1, as in every test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .conftest import REPO, TINY, clean_env, sets, train_losses

GOLDEN = REPO / "tests" / "golden" / "tiny-fp8-losses.json"
STEPS = 20


def test_main_job_first_losses_are_golden(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lptrain", "train", str(TINY / "tiny-fp8.yaml")]
    cmd += ["--run-dir", str(run_dir)]
    cmd += sets(
        f"run.stop_at_step={STEPS}",
        "logging.interval=1",
        "logging.progress=lines",
        f"data.cache_dir={data_cache}",
    )
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [float(x).hex() for x in train_losses(run_dir)]
    assert len(got) == STEPS
    if os.environ.get("LPTRAIN_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"recipe": "tiny-fp8.yaml", "losses": got}, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())["losses"]
    first = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    assert first is None, (
        f"step {first + 1}: loss {float.fromhex(got[first])!r} != golden "
        f"{float.fromhex(want[first])!r} (numerics changed; see this file's docstring)"
    )
