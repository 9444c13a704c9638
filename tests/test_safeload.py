"""lptrain/safeload.py: every pickled file lptrain reads goes through torch's restricted
unpickler; DeepSpeed's checkpoint files of every ZeRO stage pass it, a pickled payload does not
and never runs."""

from __future__ import annotations

import os

import pytest
import torch

from lptrain import safeload
from lptrain.errors import ConfigError
from tests.helpers import FAST, TINY, lptrain, sets


class Payload:
    """What a hostile checkpoint carries: unpickling it with weights_only=False runs os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_payload_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload(marker)}, path)
    for mmap in (False, True):
        with pytest.raises(ConfigError) as exc:
            safeload.load(path, "init.from", mmap=mmap)
        assert "posix.system" in exc.value.problem or "os.system" in exc.value.problem
        assert exc.value.field == "init.from"
    assert safeload.problem_in(tmp_path).startswith("evil.pt: refused")
    assert not marker.exists()


def test_truncated_file_is_one_line(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.arange(1000.0)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ConfigError, match="unreadable"):
        safeload.load(path, "PATH")


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_deepspeed_checkpoints_of_every_stage_load(tmp_path, data_cache, stage):
    """ZeRO 1-3 optimizer files hold DeepSpeed records (a loss scaler, the stage enum): the
    allow-list lets exactly those through, and the tensors come back equal."""
    run = tmp_path / "run"
    lptrain("train", TINY / "tiny-fp32.yaml", "--run-dir", run,
            *sets(*FAST, f"data.cache_dir={data_cache}", "run.max_steps=1",
                  f"deepspeed.zero_stage={stage}"))  # fmt: skip
    (tag,) = (run / "checkpoints").glob("step*")
    assert safeload.problem_in(tag) is None
    loaded = {f.name: safeload.load(f, "PATH") for f in tag.glob("*.pt")}
    assert loaded["lptrain_rank0.pt"]["progress"]["step"] == 1
    states = (
        "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    )
    assert any(k.endswith("weight") for k in loaded[states]["module"])
    if stage:
        optim = loaded["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        assert "optimizer_state_dict" in optim
