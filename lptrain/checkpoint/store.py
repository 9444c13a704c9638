"""Atomic, verified, resumable checkpoints around `engine.save_checkpoint`.

Layout: `checkpoints/step00000040/` holds DeepSpeed's files, one `lptrain_rank{r}.pt` per rank,
the `config.yaml` the state was trained with and, written last, `manifest.json` (every file's
size and SHA-256, manifest.py); `checkpoints/latest` names the newest tag.

A save goes to `<tag>.tmp`; every rank adds its side file; the manifest is written; rank 0 then
renames the directory into place, and only then rewrites `latest` and prunes. A kill at any
point leaves the previous checkpoints intact and `latest` naming one that exists. Pruning keeps
the `keep_last` newest tags up to the step just saved and never removes that one. A resume
trusts only checkpoints whose manifest verifies, newest first (`newest_verified`).

The side file exists because DeepSpeed saves no RNG state and, in ZeRO stages 0-2, writes
`client_state` from rank 0 only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

import lptrain.nn as lpnn
from lptrain import safeload
from lptrain.checkpoint import manifest
from lptrain.errors import ConfigError

FORMAT = 2  # client_state / side-file format
CONFIG = "config.yaml"  # the config the saved state was trained with
_TAG = re.compile(r"^step(\d+)$")
# Module state that belongs to a layer's quantizer, not to the model (lptrain/nn/linear.py).
_QUANTIZER_LEAVES = ("step", "seed", "int32_overflows", "signs_output", "signs_grad_input",
                     "signs_grad_weight")  # fmt: skip


@dataclass(frozen=True)
class Progress:
    """Global training position; saved in client_state and identical on every rank."""

    step: int = 0  # optimizer steps attempted (skipped ones included)
    sample_index: int = 0  # next global sample index of the data order
    tokens: int = 0
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    reloads: int = 0


@dataclass(frozen=True)
class Found:
    """A checkpoint whose manifest verified."""

    ckpt_dir: Path
    tag: str
    manifest: dict = field(repr=False)

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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


# ---------------------------------------------------------------- save


def save(
    engine,
    model: nn.Module,
    ckpt_dir: Path,
    progress: Progress,
    keep_last: int,
    config_yaml: str,
    extra: dict | None = None,
    base_dir: Path | None = None,
) -> Path:
    """`extra`: the trainer's own state beside the model (the monitoring's guard and spike
    state), kept in every rank's side file and read back with `peek` before `load`.
    `base_dir`: the run's copy of its `init.from` base (checkpoint/base.py), carried along."""
    rank = _rank()
    tag = tag_for(progress.step)
    final, tmp = ckpt_dir / tag, ckpt_dir / f"{tag}.tmp"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    with disk_errors(tmp):
        _write(engine, model, tmp, progress, config_yaml, extra, base_dir)
    if rank == 0:
        _move_into_place(ckpt_dir, tmp, final)
        write_latest(ckpt_dir, tag)
        _prune(ckpt_dir, keep_last, progress.step)
    _barrier()
    return final


def _write(engine, model, tmp: Path, progress: Progress, config_yaml, extra, base_dir) -> None:
    """Collective: every file of the checkpoint into `tmp`, the manifest last."""
    rank = _rank()
    client = {
        "lptrain": {**asdict(progress), "format": FORMAT},
        # Lets `ds_to_universal` convert stage 1/2 checkpoints without --inject_missing_state.
        "universal_checkpoint_info": {"universal_checkpoint_version": 0.4},
    }
    engine.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state=client, save_latest=False)
    _barrier()
    side = {
        "rng": _rng_state(),
        "quantizer": lpnn.quantizer_state(model),
        "progress": asdict(progress),
        "format": FORMAT,
        "extra": extra or {},
    }
    torch.save(side, tmp / f"lptrain_rank{rank}.pt")
    if rank == 0:
        (tmp / CONFIG).write_text(config_yaml)
        if base_dir is not None and base_dir.is_dir():
            shutil.copytree(base_dir, tmp / base_dir.name)
    _barrier()
    world = dist.get_world_size() if dist.is_initialized() else 1
    meta = {"tag": tag_for(progress.step), "step": progress.step, "world_size": world,
            "zero_stage": engine.zero_optimization_stage()}  # fmt: skip
    manifest.write(tmp, meta)


# Below this much free space a failed write is taken for a full disk: torch's zip writer
# reports one as a RuntimeError ("unexpected pos ..."), not as an OSError.
_NEARLY_FULL = 16 << 20


@contextlib.contextmanager
def disk_errors(tmp: Path):
    """A write into the staging directory `tmp` (a checkpoint's `.tmp`, an export's) that
    fails for the disk (full, read-only, quota) removes `tmp`, which leaves everything written
    before as it was, and raises an OSError that names the path and the OS error (the CLI
    prints it in one line and exits 2). Writers that are not Python's own report a full disk
    their way: torch's zip writer as a RuntimeError, safetensors with "os error 28"."""
    try:
        yield
    except Exception as exc:
        free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, exc.strerror, exc.filename or str(tmp)) from None
        full = "os error 28" in str(exc) or (isinstance(exc, RuntimeError) and free < _NEARLY_FULL)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from None
        raise


def _move_into_place(ckpt_dir: Path, tmp: Path, final: Path) -> None:
    if final.exists():  # a re-save of this step (a signal right after a save, or a reload)
        if read_latest(ckpt_dir) == final.name:  # never let `latest` name a missing tag
            older = [t for t in list_tags(ckpt_dir) if t != final.name]
            if older:
                write_latest(ckpt_dir, older[-1])
            else:
                (ckpt_dir / "latest").unlink()
        _remove(final)
    os.replace(tmp, final)


def write_latest(ckpt_dir: Path, tag: str) -> None:
    manifest.write_atomic(ckpt_dir / "latest", tag)


def read_latest(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / "latest").read_text().strip() or None
    except OSError:
        return None


def list_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tag directories, oldest first (by step number)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted(tags, key=step_of)


def _remove(path: Path) -> None:
    # Rename first: a deletion cut short leaves `*.deleting`, never a half checkpoint that
    # still looks like one.
    doomed = path.with_name(f"{path.name}.deleting")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _prune(ckpt_dir: Path, keep_last: int, saved_step: int) -> None:
    # Only tags up to the one just saved compete; it is the newest of them, so it is kept.
    older = [t for t in list_tags(ckpt_dir) if step_of(t) <= saved_step]
    for tag in older[:-keep_last]:
        _remove(ckpt_dir / tag)
    for stale in [*ckpt_dir.glob("*.tmp"), *ckpt_dir.glob("*.deleting")]:
        if stale.is_dir():  # left by an interrupted save or prune
            shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------- find and verify


def newest_verified(ckpt_dir: Path) -> tuple[Found | None, list[tuple[str, str]]]:
    """Collective: the newest checkpoint in `ckpt_dir` that verifies, and the newer ones that
    did not, as (tag, why). `latest` is not trusted: a tag it names that is missing or broken
    is reported, and a complete tag newer than it (a kill between rename and `latest`) wins."""
    rejected = []
    # Rank 0's view, so that every rank verifies the same tags in the same order.
    latest, empty, tags = manifest.from_rank0(
        (read_latest(ckpt_dir), (ckpt_dir / "latest").exists(), list_tags(ckpt_dir))
    )
    if latest is not None and latest not in tags:
        rejected.append((latest, "named by 'latest' but missing"))
    elif latest is None and empty:
        rejected.append(("latest", "empty"))
    for tag in reversed(tags):
        found, why = verify(ckpt_dir, tag)
        if found is not None:
            return found, rejected
        rejected.append((tag, why))
    return None, rejected


def reasons(rejected: list[tuple[str, str]]) -> str:
    """`tag: why; tag: why`, for the one line that says what did not verify."""
    return "; ".join(f"{tag}: {why}" for tag, why in rejected)


def pick(path: Path, key: str) -> tuple[Found, list[tuple[str, str]]]:
    """Collective: the checkpoint `path` names, for every reader (resume, eval, export,
    switch, init.from) alike. A tag directory verifies or is refused; a run directory or a
    `checkpoints/` directory gives its newest checkpoint that verifies, with the newer ones that
    did not. Refusals are ConfigError(key, ...)."""
    if step_of(path.name) is not None or (path / manifest.NAME).exists():
        found, why = verify(path.parent, path.name)
        if found is None:
            raise ConfigError(key, f"{path} does not verify: {why}")
        return found, []
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found, rejected = newest_verified(ckpt_dir)
    if found is None:
        why = reasons(rejected) or "no checkpoints"
        raise ConfigError(key, f"no checkpoint in {ckpt_dir} verifies ({why})")
    return found, rejected


def verify(ckpt_dir: Path, tag: str) -> tuple[Found | None, str | None]:
    """Collective: (Found, None) if `tag` verifies, else (None, why). Verified means: its
    manifest lists every file a checkpoint of its layout needs, each file has the size and
    SHA-256 the manifest records, and every pickled file holds plain data only (safeload.py).
    """
    meta, why = manifest.problem(ckpt_dir / tag)
    if meta is None:
        return None, why
    why = _layout_problem(meta) or _config_problem(ckpt_dir / tag)
    why = why or safeload.problem_in(ckpt_dir / tag)
    if why is not None:
        return None, why
    return Found(ckpt_dir, tag, meta), None


def _layout_problem(meta: dict) -> str | None:
    if "zero_stage" not in meta and not meta.get("adopted"):  # lptrain always records it
        return f"{manifest.NAME} lacks zero_stage, which lptrain records with every save"
    for names in required_files(meta):
        if not any(n in meta["files"] for n in names):
            return f"{manifest.NAME} lacks {' or '.join(names)}, which this checkpoint needs"
    return None


def _config_problem(tag_dir: Path) -> str | None:
    """The config a checkpoint carries must read as a YAML mapping (readers build from it)."""
    try:
        raw = yaml.safe_load((tag_dir / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return f"{CONFIG} unreadable ({type(exc).__name__})"
    return None if isinstance(raw, dict) else f"{CONFIG} is not a mapping of sections"


def required_files(meta: dict) -> list[tuple[str, ...]]:
    """The files a checkpoint with this manifest's layout cannot be without, each as its
    alternative names (a manifest that lists fewer was not written by a complete save)."""
    world = int(meta.get("world_size") or 1)
    need = [(CONFIG,), *((f"lptrain_rank{r}.pt",) for r in range(world))]
    stage = meta.get("zero_stage")
    if stage is None or stage in (0, 1, 2):
        need.append(("mp_rank_00_model_states.pt",) if stage is not None else MODEL_STATES)
    if stage in (1, 2, 3):  # DeepSpeed's bf16 optimizer prefixes its files with `bf16_`
        need += [tuple(f"{p}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for p in ("", "bf16_"))
                 for r in range(world)]  # fmt: skip
    if stage == 3:
        need += [(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt",) for r in range(world)]
    return need


# DeepSpeed's module file: one for ZeRO stages 0-2, one per rank for stage 3.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def has_checkpoints(ckpt_dir: Path) -> bool:
    """Any sign of an earlier run's checkpoints (a tag, even a broken one, or `latest`)."""
    return bool(list_tags(ckpt_dir)) or (ckpt_dir / "latest").exists()


def saved_config(found: Found) -> str | None:
    try:
        return (found.path / CONFIG).read_text()
    except OSError:
        return None


# ---------------------------------------------------------------- load


def peek(found: Found) -> dict:
    """The `extra` saved with a checkpoint, read before `load`: the precision guard's fallbacks
    change which quantizer-state keys the model has, so they must be in place first."""
    side = _side(found.path / f"lptrain_rank{_rank()}.pt")
    return side.get("extra", {})


def peek_rank0(found: Found) -> dict:
    """`peek` of the old rank 0's side file (a resume on another world size, whose ranks need
    not have a side file of their own)."""
    side = _side(found.path / "lptrain_rank0.pt")
    return side.get("extra", {})


def _side(path: Path) -> dict:
    """A side file, through the restricted unpickler (it holds tensors and plain data)."""
    return safeload.load(path, "checkpoint.resume")


def _is_quantizer_key(key: str) -> bool:
    parts = key.split(".")
    return "quant_state" in parts or parts[-1] in _QUANTIZER_LEAVES


def _load_without_quantizer_state(src: dict, dst: nn.Module) -> None:
    """DeepSpeed `custom_load_fn`: the model's weights and buffers from the checkpoint, its
    quantizer state left fresh (lptrain.nn.Linear accepts missing quantizer keys)."""
    kept = {k: v for k, v in src.items() if not _is_quantizer_key(k)}
    dst.load_state_dict(kept, strict=True)


def load(engine, model: nn.Module, found: Found, reset_quantizers: bool = False) -> Progress:
    """Restore engine, model, RNG and quantizer state. `reset_quantizers`: keep the freshly
    built quantizer state (a precision change allowed on resume) instead of the saved one."""
    custom = _load_without_quantizer_state if reset_quantizers else None
    _, client = engine.load_checkpoint(str(found.ckpt_dir), tag=found.tag, custom_load_fn=custom)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {found.path}")
    side = _side(found.path / f"lptrain_rank{_rank()}.pt")
    _set_rng_state(side["rng"])
    if side["quantizer"] and not reset_quantizers:
        lpnn.load_quantizer_state(model, side["quantizer"])
    fields = {k: v for k, v in client["lptrain"].items() if k in Progress.__dataclass_fields__}
    return Progress(**fields)
