"""Atomic, resumable checkpoints around `engine.save_checkpoint`.

Layout: `checkpoints/step00000040/` (DeepSpeed's files + `lptrain_rank{r}.pt`) and `latest`.
A save goes to `<tag>.tmp`, every rank adds its side file, then rank 0 renames the directory and
only then rewrites `latest`: an interrupted save leaves a stray `.tmp` and the previous
checkpoint intact. The side file exists because DeepSpeed saves no RNG state and, in ZeRO
stages 0-2, writes `client_state` from rank 0 only.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lptrain.nn as lpnn

FORMAT = 1
_TAG = re.compile(r"^step(\d+)$")


@dataclass(frozen=True)
class Progress:
    """Global training position; saved in client_state and identical on every rank."""

    step: int = 0  # optimizer steps attempted (skipped ones included)
    sample_index: int = 0  # next global sample index of the data order
    tokens: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    reloads: int = 0


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine,
    model: nn.Module,
    ckpt_dir: Path,
    progress: Progress,
    keep_last: int,
    config_hash: str,
    extra: dict | None = None,
) -> Path:
    """`extra`: the trainer's own state beside the model (the monitoring's guard and spike
    state), kept in every rank's side file and read back with `peek` before `load`."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(progress.step)
    final, tmp = ckpt_dir / tag, ckpt_dir / f"{tag}.tmp"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    client = {
        "lptrain": {**asdict(progress), "format": FORMAT, "config_hash": config_hash},
        # Lets `ds_to_universal` convert stage 1/2 checkpoints without --inject_missing_state.
        "universal_checkpoint_info": {"universal_checkpoint_version": 0.4},
    }
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client, save_latest=False)
    _barrier()
    side = {
        "rng": _rng_state(),
        "quantizer": lpnn.quantizer_state(model),
        "progress": asdict(progress),
        "format": FORMAT,
        "extra": extra or {},
    }
    torch.save(side, tmp / f"lptrain_rank{rank}.pt")
    _barrier()
    if rank == 0:
        if final.exists():  # a re-save of the same step (e.g. a signal right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(ckpt_dir, tag)
        _prune(ckpt_dir, keep_last)
    _barrier()
    return final


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / "latest")


def list_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    for tag in list_tags(ckpt_dir)[:-keep_last]:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    for stale in ckpt_dir.glob("*.tmp"):  # left by an interrupted save
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def find(resume: str, run_ckpt_dir: Path) -> tuple[Path, str] | None:
    """(checkpoints dir, tag) to resume from, or None for a fresh start."""
    if resume == "none":
        return None
    path = run_ckpt_dir if resume == "auto" else Path(resume)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if resume != "auto" and path.is_dir() and any(path.glob("lptrain_rank*.pt")):
        return path.parent, path.name
    if resume != "auto":
        raise FileNotFoundError(f"{resume} holds no 'latest' file and is not a checkpoint tag")
    return None


def peek(ckpt_dir: Path, tag: str) -> dict:
    """The `extra` saved with a checkpoint, read before `load`: the precision guard's fallbacks
    change which quantizer-state keys the model has, so they must be in place first."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    side = torch.load(ckpt_dir / tag / f"lptrain_rank{rank}.pt", weights_only=False)
    return side.get("extra", {})


def load(engine, model: nn.Module, ckpt_dir: Path, tag: str) -> Progress:
    rank = dist.get_rank() if dist.is_initialized() else 0
    _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    side = torch.load(ckpt_dir / tag / f"lptrain_rank{rank}.pt", weights_only=False)
    _set_rng_state(side["rng"])
    if side["quantizer"]:
        lpnn.load_quantizer_state(model, side["quantizer"])
    fields = {k: v for k, v in client["lptrain"].items() if k in Progress.__dataclass_fields__}
    return Progress(**fields)
