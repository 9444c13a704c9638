"""lptrain/safeload.py: every pickled file lptrain reads goes through torch's restricted
unpickler; DeepSpeed's checkpoint files of every ZeRO stage pass it, a pickled payload does not
and never runs."""

from __future__ import annotations

import os

import pytest
import torch

from lptrain import safeload
from lptrain.checkpoint import store
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


def test_a_symbolic_link_is_refused(tmp_path):
    """A loader that lists folders (DeepSpeed's universal checkpoint) follows a link the scan
    would not: a link anywhere in a checkpoint is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    torch.save({"x": Payload(tmp_path / "ran")}, outside / "fp32.pt")
    tag = tmp_path / "tag" / "zero"
    tag.mkdir(parents=True)
    (tag / "embed.weight").symlink_to(outside, target_is_directory=True)
    assert safeload.problem_in(tmp_path / "tag") == (
        "zero/embed.weight: refused: a symbolic link (checkpoints hold files)"
    )


@pytest.mark.parametrize(
    "recipe,stage", [("fp32", 0), ("fp32", 1), ("fp32", 3), ("bf16", 1), ("bf16", 3)]
)
def test_deepspeed_checkpoints_of_every_stage_load(tmp_path, data_cache, recipe, stage):
    """ZeRO 1-3 optimizer files hold DeepSpeed records (a loss scaler, the stage enum): the
    allow-list lets exactly those through; every layout verifies (bf16's optimizer files are
    named `bf16_zero_pp_rank_*`)."""
    run = tmp_path / "run"
    lptrain("train", TINY / f"tiny-{recipe}.yaml", "--run-dir", run,
            *sets(*FAST, f"data.cache_dir={data_cache}", "run.max_steps=1",
                  f"deepspeed.zero_stage={stage}"))  # fmt: skip
    (tag,) = (run / "checkpoints").glob("step*")
    assert safeload.problem_in(tag) is None
    assert store.verify(tag.parent, tag.name)[1] is None
    loaded = {f.name: safeload.load(f, "PATH") for f in tag.glob("*.pt")}
    assert loaded["lptrain_rank0.pt"]["progress"]["step"] == 1
    states = (
        "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    )
    assert any(k.endswith("weight") for k in loaded[states]["module"])
    if stage:
        prefix = "bf16_" if recipe == "bf16" else ""
        optim = loaded[f"{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        assert "optimizer_state_dict" in optim
