"""export/restore.py: a run trained on the Triton backend is read back on a CPU machine."""

import pytest

from lptrain.config import schema
from lptrain.data import dataset
from lptrain.errors import ConfigError
from lptrain.export import restore
from lptrain.nn import Linear
from lptrain.nn.backends import BackendError
from lptrain.nn.backends import resolve as resolve_backend
from lptrain.recipes import get


def _cfg(backend: str):
    return schema.load(
        "recipes/pretrain/tiny-fp8.yaml",
        [f"precision.backend={backend}", "model.n_layers=1"],
    )


@pytest.fixture
def no_interpreter(monkeypatch):
    """A CPU machine as users have it: the tests' Triton interpreter (conftest) off. Through
    the environment, which Triton reads at each use: setting its knob would pin the value for
    the tests that follow once monkeypatch puts it back."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_triton_run_restores_on_the_emulated_backend(no_interpreter):
    with pytest.raises(BackendError):  # the premise: Triton cannot run here
        resolve_backend("triton", get("fp8-current"))
    notes = []
    cfg = restore.portable(_cfg("triton"), notes.append)
    assert cfg.precision.backend == "auto" and "same bits" in notes[0]
    model = restore.skeleton(_cfg("triton"), dataset.load_tokenizer("byte"))
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert layers and {m.backend.name for m in layers} == {"emulated"}


def test_other_backends_are_kept(no_interpreter):
    for name in ("auto", "emulated", "te"):
        assert restore.portable(_cfg(name)).precision.backend == name
    with pytest.raises(ConfigError, match="precision.backend"):  # TE swaps layers: still refused
        restore.skeleton(_cfg("te"), dataset.load_tokenizer("byte"))
