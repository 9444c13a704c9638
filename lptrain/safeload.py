"""Reading pickled checkpoint files without running code from them.

A checkpoint may come from someone else (a shared run directory, an `init.from` base), and a
`.pt` file is a pickle: loaded with `torch.load(weights_only=False)` it can run any code its
writer chose. lptrain therefore reads every `.pt` file through torch's restricted unpickler
(`weights_only=True`), which builds only tensors, plain containers and numbers, plus the few
DeepSpeed classes in `ALLOWED` that DeepSpeed's own optimizer-state files hold.

DeepSpeed's loaders (`engine.load_checkpoint`, `zero_to_fp32`, `ds_to_universal`) still call
`torch.load(weights_only=False)` themselves. Before lptrain hands a checkpoint directory to
them, `problem_in` (part of checkpoint/store.py `verify`) unpickles every `.pt` file in it
with the restricted unpickler (memory-mapped: the tensor bytes are not read). A file that
holds anything else is refused, so what DeepSpeed then unpickles is plain data. The files'
sizes and SHA-256 are checked against the manifest in the same `verify`.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import torch

from lptrain.errors import ConfigError

# The classes DeepSpeed pickles into its optimizer-state files (ZeRO 1-3, bf16 and fp16
# optimizers), found with torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints
# of every stage and dtype. Each is a plain record (a config enum, a named tuple, a loss-scale
# holder); none runs code when it is rebuilt.
ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed_classes() -> list[type]:
    out = []
    for dotted in ALLOWED:
        module, name = dotted.rsplit(".", 1)
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: not needed then
            continue
    return out


def _refusal(path: Path, exc: Exception) -> str:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not even a readable torch file
        found = []
    foreign = [g for g in found if g not in ALLOWED]
    what = f"it holds {', '.join(foreign[:3])}" if foreign else _first_line(exc)
    return (
        f"{path}: refused: {what}, which lptrain does not unpickle from a checkpoint (only "
        "tensors, plain data and DeepSpeed's optimizer records can be read; see README, "
        "'What you may load from others')"
    )


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load(path: Path, key: str, mmap: bool = False):
    """The contents of `path`, unpickled with the restricted unpickler; ConfigError(key, ...)
    naming the file when it holds anything else or cannot be read."""
    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise ConfigError(key, _refusal(path, exc)) from None
    except (OSError, RuntimeError, EOFError) as exc:  # truncated or not a torch file
        raise ConfigError(key, f"{path}: unreadable ({_first_line(exc)})") from None


def problem_in(tag_dir: Path) -> str | None:
    """Why a `.pt` file under `tag_dir` may not be unpickled (the first such file), or None.
    Tensors are memory-mapped, not read: this costs the unpickling only. A symbolic link
    anywhere under `tag_dir` is refused too: a check that does not follow it would miss what
    a loader that does (DeepSpeed lists folders and loads what it finds) reads through it."""
    for path in sorted(tag_dir.rglob("*")):
        if path.is_symlink():
            return f"{path.relative_to(tag_dir)}: refused: a symbolic link (checkpoints hold files)"
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            load(path, "checkpoint", mmap=True)
        except ConfigError as exc:
            return exc.problem.replace(f"{path}: ", f"{path.relative_to(tag_dir)}: ", 1)
    return None
