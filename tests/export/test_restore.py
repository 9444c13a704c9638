"""export/restore.py: a run trained on the Triton backend is read back on a CPU machine."""

import pytest
import torch

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


def test_bf16_sr_run_evaluates_and_exports_to_its_logged_val_loss(cli, tmp_path, capsys):
    """optim.master=bf16-sr trains bf16 parameters (no fp32 copy): `lptrain eval` of the run and
    of its export computes with them as training did, so both give the logged val_loss to the
    last bit (an fp32 model holding the same bf16 weights was 2e-4 nats off)."""
    import json

    from tests.helpers import metrics
    from tests.trainer.test_finetune import in_process

    run = tmp_path / "run"
    cli("tiny-fp32.yaml", "optim.master=bf16-sr", "deepspeed.dtype=bf16", "optim.states=fp8",
        "run.max_steps=2", "run.eval_interval=2", "run.eval_batches=2", run_dir=run)  # fmt: skip
    (logged,) = [row["val_loss"] for row in metrics(run) if "val_loss" in row]

    def eval_loss(path) -> float:
        code, out, _ = in_process(capsys, "eval", path, "--json", "--blocks", 16)  # 2 x 8 blocks
        assert code == 0, out
        return json.loads(out.splitlines()[-1])["loss"]

    assert eval_loss(run) == logged
    code, out, _ = in_process(capsys, "export", run, "--blocks", 16)
    assert code == 0 and "holds its weights as trained" in out, out
    assert eval_loss(run / "export") == logged
    exported = restore.open_export(run / "export").model
    assert {p.dtype for p in exported.parameters()} == {torch.bfloat16}
