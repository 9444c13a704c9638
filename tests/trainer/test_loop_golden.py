"""The main job's first 10 losses against golden values, within a bound measured across CPUs.

`lptrain train recipes/pretrain/tiny-fp8.yaml` exactly as the README runs it (the schedule spans
its 300 steps), stopped at step 10, one thread (OMP_NUM_THREADS=1, as in every test).

The losses go through the BLAS's GEMM kernels, which differ per instruction set and vendor:
step 1 already differs under ATEN_CPU_CAPABILITY=default, and on an AMD EPYC (AVX2) step 2 did.
So this test is not bit for bit. The largest relative difference from the golden values over
the first 10 steps, measured on 2026-12-07 (Intel Xeon, avx512 / avx2 / default), was 3.0e-5
(AMD EPYC avx2, reported: 9.1e-6 at step 2); the bound is 2e-4. From step 13 the runs part
further (a delayed-scaling decision flips: 8e-4, and 2% by step 20), hence 10 steps.

The bound catches gross regressions only: training with fp8-current instead of fp8-delayed
stays within 1.1e-4 over these steps. The bits lptrain defines itself, every recipe's
quantizers, are compared exactly on any CPU in tests/nn/backends/test_emulated_golden.py.

A deliberate numerics change regenerates tests/golden/tiny-fp8-losses.json with
`LPTRAIN_UPDATE_GOLDEN=1 python -m pytest tests/trainer/test_loop_golden.py` and says why in
its commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO, TINY, clean_env, sets, train_losses

GOLDEN = REPO / "tests" / "golden" / "tiny-fp8-losses.json"
STEPS = 10
REL_TOL = 2e-4


def test_main_job_first_losses_match_golden_within_the_cross_cpu_bound(tmp_path, data_cache):
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
    got = train_losses(run_dir)
    assert len(got) == STEPS
    if os.environ.get("LPTRAIN_UPDATE_GOLDEN") == "1":
        text = json.dumps({"recipe": "tiny-fp8.yaml", "losses": [x.hex() for x in got]}, indent=1)
        GOLDEN.write_text(text + "\n")
    want = [float.fromhex(x) for x in json.loads(GOLDEN.read_text())["losses"]]
    assert len(want) == STEPS
    worst = max(range(STEPS), key=lambda i: abs(got[i] - want[i]) / want[i])
    rel = abs(got[worst] - want[worst]) / want[worst]
    assert rel <= REL_TOL, (
        f"step {worst + 1}: loss {got[worst]!r} vs golden {want[worst]!r}, relative difference "
        f"{rel:.1e} > {REL_TOL:.0e} (numerics changed; see this file's docstring)"
    )
