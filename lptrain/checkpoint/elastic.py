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
- Compact optimizer states (`optim.states` bf16 | fp8 | int8-block, ZeRO 1-2): DeepSpeed's
  converter reads fp32 moments, so it is handed a copy of the checkpoint whose optimizer files
  hold the decoded moments (the universal copy then holds fp32 moments, as that format
  defines). After the load, each new rank's moments are replaced by the codes and scales cut
  from the saved ones (optim/reshard.py): bit for bit, except a block cut by an old or new
  partition boundary, which is encoded again. Old ranks' states saved before group-aligned
  blocks (no `reshard.LAYOUT` in their param groups) are read in the blocks they were saved in:
  decoded so for the converter, re-encoded once in the buffer's blocks before the cut (this is
  converted rather than refused: the old layout is known exactly, so nothing is lost but one
  requantization, and the run says so). ZeRO-3 is refused: it splits every parameter over the
  ranks and the blocks run across those pieces, so they have no rank-independent form.

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
from lptrain.distributed.engine import all_reduce, flat_partitions, universal_loaded
from lptrain.errors import ConfigError
from lptrain.optim import reshard
from lptrain.optim.states import get_state_format

# Keys a universal resume may change: the layout is re-made from the new world size.
LAYOUT_KEYS = ("deepspeed.micro_batch", "deepspeed.grad_accum", "deepspeed.train_batch_size")


def universal_path(found: Found, ckpt_dir: Path) -> Path:
    """Where the universal copy of `found` goes: under `ckpt_dir`, the resuming run's own
    checkpoint directory (the source's only when they are the same run)."""
    return ckpt_dir / "universal" / found.tag


def command(found: Found, ckpt_dir: Path, source: Path | None = None) -> str:
    """The one command that makes the universal copy by hand, from `source` (the checkpoint as
    the converter reads it; `found` itself unless given)."""
    return (
        f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {source or found.path} "
        f"--output_folder {universal_path(found, ckpt_dir)}"
    )


def check(found: Found, world: int, ckpt_dir: Path, states: str = "fp32") -> str:
    """The note for a resume on another world size; ConfigError where none is possible.
    `states`: the run's optim.states (a resume cannot change it)."""
    stage = found.manifest.get("zero_stage")
    saved = found.manifest.get("world_size")
    if stage == 0:
        raise ConfigError(
            "checkpoint.resume",
            f"{found.tag} was saved by {saved} ranks with ZeRO stage 0 and this run has {world}; "
            "a universal checkpoint needs ZeRO stage 1-3 (resume with the same number of ranks)",
        )
    if states != "fp32" and stage == 3:
        raise ConfigError(
            "optim.states",
            f"{found.tag} was saved by {saved} ranks with ZeRO stage 3 and this run has {world}: "
            f"ZeRO-3 splits each parameter over the ranks and the {states} blocks run across "
            "those pieces, so they have no form independent of the rank count; resume with the "
            "same number of ranks (ZeRO 1-2 compact states resume on any)",
        )
    out = universal_path(found, ckpt_dir)
    how = "using" if out.is_dir() else "converting it once into"
    return (
        f"checkpoint: {found.tag} was saved by {saved} ranks, this run has {world}: resuming "
        f"through a DeepSpeed universal checkpoint ({how} {out})"
    )


def ensure_universal(found: Found, ckpt_dir: Path, say, states: str = "fp32") -> Path:
    """Collective: the universal copy of `found` under `ckpt_dir`, converted by rank 0 if
    missing (or made from another checkpoint). `states`: the run's optim.states."""
    out = universal_path(found, ckpt_dir)
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        error = None if _usable(out, found, say) else _convert(found, out, say, states)
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


def _convert(found: Found, out: Path, say, states: str) -> str | None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    say(f"checkpoint: converting {found.path} to a universal checkpoint (ds_to_universal)")
    source = found.path if states == "fp32" else _decoded_copy(found, out, states)
    error = None
    try:
        error = _run_converter(found, source, out, tmp)
    finally:
        if source != found.path and error is None:  # converted (or raised): not needed
            shutil.rmtree(source, ignore_errors=True)
    if source == found.path or error is None:
        return error
    # The converter cannot read compact moments: the command in the error points at the
    # decoded copy, kept for it (the next resume makes it again).
    return (
        f"{error} (its input is {found.path} with the {states} moments decoded to fp32, which "
        "the converter reads; kept for this command)"
    )


def _optim_files(found: Found) -> list[Path]:
    """The ZeRO 1-2 optimizer files, in data-parallel rank order."""
    return sorted(found.path.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank)


def _rank(optim_file: Path) -> int:
    return int(optim_file.name.split("_")[3])  # zero_pp_rank_<r>_mp_rank_00_optim_states.pt


def _start(optim_file: Path, part: dict, fmt) -> int:
    """Where the slice of `part`, from `optim_file`, starts in its group's buffer (ZeRO 1-2
    slices are equal: the old rank times the slice's length)."""
    return _rank(optim_file) * part["exp_avg_codes" if fmt.dtype is None else "exp_avg"].numel()


def _decoded_copy(found: Found, out: Path, states: str) -> Path:
    """`found` as DeepSpeed's converter reads it: links to its files, except the optimizer
    files, written again with each moment decoded to FP32 (nothing is written in `found`)."""
    copy = out.with_name(out.name + ".input")
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for f in found.path.iterdir():
        os.symlink(f.resolve(), copy / f.name)
    fmt = get_state_format(states)
    for f in _optim_files(found):
        saved = safeload.load(f, "checkpoint.resume")
        base = saved["optimizer_state_dict"]["base_optimizer_state"]
        for i, part in base["state"].items():
            start = reshard.saved_start(base["param_groups"][i], _start(f, part, fmt))
            base["state"][i] = reshard.decoded(part, fmt, start)
        (copy / f.name).unlink()
        torch.save(saved, copy / f.name)
    return copy


def _run_converter(found: Found, source: Path, out: Path, tmp: Path) -> str | None:
    # -P: the working directory (perhaps the received run directory) is not put on sys.path,
    # so no `deepspeed/` folder there can stand in for DeepSpeed's converter.
    cmd = [sys.executable, "-P", "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(source), "--output_folder", str(tmp)]  # fmt: skip
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
            command(found, out.parent.parent, source)
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


def _compact_states(engine, found: Found, states: str, say) -> None:
    """Collective: put the saved codes and scales in place of the FP32 moments the universal
    load gave this rank's `CompactAdamW` (module docstring; ZeRO 1-2, `check` refuses ZeRO-3)."""
    inner, fmt = engine.optimizer.optimizer, get_state_format(states)
    olds, changed = _group_aligned(found, fmt)
    if changed is not None:  # every rank read all old files: the same count on each
        say(reshard.regrouped_note(states, changed))
    redone = 0
    for i, (flat, start, numel) in enumerate(flat_partitions(engine)):
        state, n = reshard.partition([o[i] for o in olds], fmt, numel, start, len(flat))
        inner.state[flat] = state
        inner.param_groups[i][reshard.LAYOUT] = reshard.GROUP_ALIGNED  # what it now holds
        redone += n
    (redone,) = all_reduce([float(redone)], dist.ReduceOp.SUM)  # over the new ranks
    if fmt.dtype is None:
        say(f"checkpoint: {states} optimizer states carried over bit for bit, except {redone:.0f} "
            "block(s) cut by a partition boundary, encoded again")  # fmt: skip


def _group_aligned(found: Found, fmt) -> tuple[list[dict], int | None]:
    """Every old rank's slice states (per rank, per group), in group-aligned blocks: a state
    saved before them is re-encoded once (`reshard.regrouped`). Also the blocks that changed
    in value, or None where none was re-encoded."""
    olds, changed = [], None
    for f in _optim_files(found):
        base = safeload.load(f, "checkpoint.resume")["optimizer_state_dict"]["base_optimizer_state"]
        parts = {}
        for i, part in base["state"].items():
            start = _start(f, part, fmt)
            saved_at = reshard.saved_start(base["param_groups"][i], start)
            parts[i], n = reshard.regrouped(part, fmt, saved_at, start)
            changed = changed if n is None else (changed or 0) + n
        olds.append(parts)
    return olds, changed


def load(engine, model: nn.Module, found: Found, ckpt_dir: Path, cfg, say) -> Progress:
    """Load `found` saved on another world size through its universal copy under `ckpt_dir`,
    this run's checkpoint directory (see the module docstring)."""
    path = ensure_universal(found, ckpt_dir, say, cfg.optim.states)
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    universal_loaded(engine, cfg)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {path}")
    if cfg.optim.states != "fp32":
        _compact_states(engine, found, cfg.optim.states, say)
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
