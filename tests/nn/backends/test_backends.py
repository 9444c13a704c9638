"""Backend resolution (nn/backends/__init__.py): one choice per model, the reason logged,
clear refusals naming what to do."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lptrain
from lptrain import recipes
from lptrain.config.precision import resolve_recipe
from lptrain.config.schema import load
from lptrain.nn import Linear
from lptrain.nn.backends import resolve

GPU_RECIPES = sorted(Path(__file__).parents[3].glob("recipes/pretrain/gpu-*.yaml"))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        Linear(8, 8, backend="cuda")


def test_auto_without_a_gpu_is_the_emulated_backend_and_says_why(caplog):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: auto may pick triton")
    backend, why = resolve("auto", recipes.get("fp8-current"), "cpu")
    assert backend.name == "emulated" and why == "auto: emulated (triton: no CUDA device)"
    with caplog.at_level(logging.INFO, logger="lptrain"):
        lptrain.convert(nn.Sequential(nn.Linear(16, 16)), "fp8-current")
    assert "backend emulated: auto: emulated (triton: no CUDA device)" in caplog.text
    assert (
        resolve("auto", recipes.get("fp32"))[1] == "auto: emulated (the recipe quantizes nothing)"
    )


def test_triton_on_a_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    # Through the environment, which Triton reads at each use: setting its knob instead would
    # pin the value for every later test once monkeypatch puts it back.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"'triton' is not available: .*CUDA.*TRITON_INTERPRET"):
        resolve("triton", recipes.get("fp8-current"), "cpu")


def test_te_needs_whole_layers_and_transformer_engine():
    with pytest.raises(ValueError, match=r"swaps whole layers.*lptrain.convert\(model"):
        Linear(16, 16, backend="te")
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"TransformerEngine is not installed.*lptrain\[te\]"):
            lptrain.convert(nn.Sequential(nn.Linear(16, 16)), "fp8-current", backend="te")


def test_a_backend_that_fails_its_self_test_is_refused(monkeypatch):
    pytest.importorskip("triton")
    from lptrain.kernels import quantize as kq
    from lptrain.nn.backends import selftest

    selftest._DONE.clear()
    real = kq.quantize_kernel
    # A kernel that drops the tensor scale (the kind of silent error a new GPU can produce).
    monkeypatch.setattr("lptrain.kernels.launch.quantize_kernel", _ScaleDropping(real))
    try:
        with pytest.raises(ValueError, match=r"cannot run recipe 'fp8-current': output: .*differ"):
            resolve("triton", recipes.get("fp8-current"), "cpu")
    finally:
        selftest._DONE.clear()


class _ScaleDropping:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(x, R, C, sr, sc, enc, dec, *rest, **kw):
            return self.kernel[grid](x, R, C, sr, sc, torch.ones_like(enc), dec, *rest, **kw)

        return launch


@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_passes_the_self_test_through_convert(name: str):
    """The path users take: convert -> resolve -> the self-test on the device (here Triton's
    interpreter); a refusal raises with the first disagreement."""
    pytest.importorskip("triton")
    said = []
    model = lptrain.convert(nn.Sequential(nn.Linear(64, 64)), name, backend="triton",
                            log_fn=said.append)  # fmt: skip
    if recipes.get(name).quantizes:
        assert model[0].backend.name == "triton"
        assert said and "backend triton: triton (requested; " in said[0]


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_each_gpu_recipe_runs_on_the_backend_its_auto_picks(path):
    """On a GPU, `backend: auto` picks triton when the recipe passes the self-test; a recipe
    file whose precision the Triton backend refuses must say why (none does today)."""
    pytest.importorskip("triton")
    cfg = load(path)
    recipe = resolve_recipe(cfg.precision)
    assert cfg.precision.backend == "auto"
    if recipe.quantizes:  # memoized: the same (backend, recipe, device) as the test above
        backend, why = resolve("triton", recipe, "cpu")
        assert backend.name == "triton", why


def test_importing_lptrain_never_imports_triton_or_te():
    code = (
        "import sys, lptrain, lptrain.nn, lptrain.recipes, lptrain.trainer.loop; "
        "lptrain.nn.Linear(8, 8, recipe='fp8-current'); "
        "print(sorted(m for m in ('triton', 'transformer_engine') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_model_converted_on_the_cpu_resolves_for_the_gpu_it_will_run_on(monkeypatch):
    from lptrain.nn import backends

    seen = []
    monkeypatch.setattr(backends, "_has_cuda", lambda: True)
    monkeypatch.setattr(backends, "_triton_unavailable", lambda d: seen.append(d) or "stub")
    backend, why = resolve("auto", recipes.get("fp8-current"), "cpu")  # DeepSpeed moves it later
    assert seen == [torch.device("cuda")] and why == "auto: emulated (triton: stub)"
