"""Elastic resume: a checkpoint saved on N ranks resumes on M ranks through DeepSpeed's universal
checkpoint (`ds_to_universal`, `"checkpoint": {"load_universal": true}`), quantizer state
included.

The universal copy of a checkpoint is made once, by rank 0, with DeepSpeed's own converter,
into the resuming run's `checkpoints/universal/<tag>` (written to `<tag>.tmp` and renamed: a
killed conversion leaves nothing that looks complete). The source is only read: another run's
directory (`checkpoint.resume=OTHER/checkpoints/<tag>`) gets nothing written into it. The copy's
manifest names its source, so a copy of another checkpoint with the same tag is made again.

What DeepSpeed restores: parameters, Adam moments and step, the lr schedule, `client_state`.
What lptrain restores itself, because a universal load skips the module state dict:

- Module buffers (delayed-scaling amax histories and scales, call counters, fixed Hadamard
  signs) from the old rank 0's model-states file. Merging rule: these are equal on every old
  rank (amaxes are MAX-reduced over the data-parallel group, every rank makes the same calls,
  fixed signs are drawn from the layer name), so rank 0's copy is every rank's.
- Per-rank random streams are re-derived, not copied: each new rank's quantizer seeds come from
  (run seed, new rank, layer name) exactly as a fresh start seeds them, and stochastic-rounding
  bits are a function of that seed and the layer's call counter, restored above; the torch RNG
  (dropout) is seeded from (run seed, new rank, step). A resumed run is therefore reproducible:
  the same checkpoint on the same M ranks gives the same numbers.
- `int32_overflows` (a per-rank diagnostic counter) restarts at the old rank r's value for
  new ranks r < N, else 0.

The data position is the global sample index, so the order continues whatever the new layout;
`deepspeed.micro_batch`, `grad_accum` and `train_batch_size` may change on such a resume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lptrain.nn as lpnn
from lptrain import safeload
from lptrain.checkpoint import manifest
from lptrain.checkpoint.store import Found, Progress
from lptrain.distributed.engine import universal_loaded
from lptrain.errors import ConfigError

# Keys a universal resume may change: the layout is re-made from the new world size.
LAYOUT_KEYS = ("deepspeed.micro_batch", "deepspeed.grad_accum", "deepspeed.train_batch_size")


def universal_path(found: Found, ckpt_dir: Path) -> Path:
    """Where the universal copy of `found` goes: under `ckpt_dir`, the resuming run's own
    checkpoint directory (the source's only when they are the same run)."""
    return ckpt_dir / "universal" / found.tag


def command(found: Found, ckpt_dir: Path) -> str:
    """The one command that makes the universal copy by hand."""
    return (
        f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {found.path} "
        f"--output_folder {universal_path(found, ckpt_dir)}"
    )


def check(found: Found, world: int, ckpt_dir: Path, states: str = "fp32") -> str:
    """The note for a resume on another world size; ConfigError where none is possible.
    `states`: the run's optim.states (a resume cannot change it)."""
    stage = found.manifest.get("zero_stage")
    saved = found.manifest.get("world_size")
    if states != "fp32":
        raise ConfigError(
            "optim.states",
            f"{found.tag} was saved by {saved} ranks and this run has {world}: that goes through "
            f"a DeepSpeed universal checkpoint, whose converter reads fp32 Adam moments, not "
            f"{states} codes; resume with the same number of ranks",
        )
    if stage == 0:
        raise ConfigError(
            "checkpoint.resume",
            f"{found.tag} was saved by {saved} ranks with ZeRO stage 0 and this run has {world}; "
            "a universal checkpoint needs ZeRO stage 1-3 (resume with the same number of ranks)",
        )
    out = universal_path(found, ckpt_dir)
    how = "using" if out.is_dir() else "converting it once into"
    return (
        f"checkpoint: {found.tag} was saved by {saved} ranks, this run has {world}: resuming "
        f"through a DeepSpeed universal checkpoint ({how} {out})"
    )


def ensure_universal(found: Found, ckpt_dir: Path, say) -> Path:
    """Collective: the universal copy of `found` under `ckpt_dir`, converted by rank 0 if
    missing (or made from another checkpoint)."""
    out = universal_path(found, ckpt_dir)
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        error = None if _usable(out, found, say) else _convert(found, out, say)
    error = manifest.from_rank0(error)
    if error is not None:
        raise ConfigError("checkpoint.resume", error)
    return out


def _source(found: Found) -> str:
    return str(found.path.resolve())


def _usable(out: Path, found: Found, say) -> bool:
    """An existing universal copy is used only if it verifies like a checkpoint (its manifest,
    written by `_convert`, and plain data in every file) and was made from `found`; anything
    else is made again."""
    if not out.is_dir():
        return False
    meta, why = manifest.problem_local(out)
    why = why or safeload.problem_in(out)
    if why is None and meta.get("source") != _source(found):
        why = f"made from {meta.get('source')}, not {_source(found)}"
    if why is None:
        return True
    say(f"checkpoint: the universal copy {out} does not verify ({why}); converting again")
    doomed = out.with_name(out.name + ".deleting")
    os.replace(out, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
    return False


def _convert(found: Found, out: Path, say) -> str | None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    say(f"checkpoint: converting {found.path} to a universal checkpoint (ds_to_universal)")
    # -P: the working directory (perhaps the received run directory) is not put on sys.path,
    # so no `deepspeed/` folder there can stand in for DeepSpeed's converter.
    cmd = [sys.executable, "-P", "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(found.path), "--output_folder", str(tmp)]  # fmt: skip
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)  # the converter is a single process, not one of this job's ranks
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"converting {found.tag} to a universal checkpoint failed ({last}); run: " + (
            command(found, out.parent.parent)
        )
    meta = {"tag": found.tag, "universal_of": found.manifest.get("tag"), "source": _source(found)}
    manifest.write_local(tmp, meta)
    os.replace(tmp, out)
    return None


def _module_buffers(found: Found, model: nn.Module) -> dict:
    """The non-parameter entries of the old rank 0's module state (ZeRO-3 keeps one
    model-states file per rank, stages 0-2 one for all)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = found.path / name
        if path.exists():
            module = safeload.load(path, "checkpoint.resume")["module"]
            break
    else:
        raise ConfigError("checkpoint.resume", f"{found.path} has no model-states file")
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in module.items() if k not in params}


def load(engine, model: nn.Module, found: Found, ckpt_dir: Path, cfg, say) -> Progress:
    """Load `found` saved on another world size through its universal copy under `ckpt_dir`,
    this run's checkpoint directory (see the module docstring)."""
    path = ensure_universal(found, ckpt_dir, say)
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    universal_loaded(engine, cfg)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {path}")
    buffers = _module_buffers(found, model)
    missing = [k for k in buffers if k not in dict(model.named_buffers())]
    if missing:
        raise RuntimeError(f"{found.path}: buffers this model lacks: {missing[:3]}")
    with torch.no_grad():
        own = dict(model.named_buffers())
        for k, v in buffers.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))
    rank = dist.get_rank() if dist.is_initialized() else 0
    seed = cfg.run.seed
    lpnn.seed_quantizers(model, seed, rank)
    side = found.path / f"lptrain_rank{rank}.pt"
    overflows = safeload.load(side, "checkpoint.resume")["quantizer"] if side.exists() else {}
    for name, layer in lpnn.quantized_layers(model):
        layer.int32_overflows.fill_(int(overflows.get(name, {}).get("int32_overflows", 0)))
    fields = {k: v for k, v in client["lptrain"].items() if k in Progress.__dataclass_fields__}
    progress = Progress(**fields)
    torch.manual_seed(seed * 1000003 + rank + 7919 * progress.step)  # dropout: a fresh stream
    return progress
