"""Checkpoints without DeepSpeed, for tests of checkpoint/resume logic that need only files."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lptrain.checkpoint import store

MODEL = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class FakeEngine:
    """Writes the files DeepSpeed's `save_checkpoint` writes for ZeRO-1 on one rank."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        torch.save({"module": {"w": torch.ones(64)}, **client_state}, d / MODEL)
        torch.save({"state": torch.arange(4096.0)}, d / OPTIM)

    def zero_optimization_stage(self) -> int:
        return 1


def save(ckpt: Path, step: int, config_yaml: str = "run: {seed: 0}\n", keep_last: int = 3) -> Path:
    """A complete, verifiable checkpoint of `step` in `ckpt` (lptrain.checkpoint.store.save)."""

    progress = store.Progress(step=step)
    return store.save(FakeEngine(), nn.Sequential(), ckpt, progress, keep_last, config_yaml)
