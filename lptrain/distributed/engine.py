"""Everything DeepSpeed: process group, the generated config, `deepspeed.initialize`, and the
engine's step bookkeeping (gradient norm, skipped updates) that other modules must not touch.

The order is fixed by the trainer: seed -> build model -> converters (models/converters.py) ->
`initialize`. Anything that edits parameters after `initialize` is undone by the optimizer's
fp32 master copy.

Longer than our usual file on purpose: the engine's internals (micro-step counters, the
optimizer's overflow flag, the CPU start-up workarounds) stay behind this one module's
functions instead of being passed between several.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lptrain import liblog
from lptrain.config.schema import TrainConfig
from lptrain.errors import ConfigError
from lptrain.optim import CompactAdamW, reshard

# Launchers (torchrun, deepspeed) set these; a bare `lptrain train` sets them itself, or
# DeepSpeed falls back to MPI discovery and dies on the missing mpi4py.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    cuda: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_env(local_rank_flag: int | None = None) -> DistInfo:
    """Fill in the single-process rendezvous variables when no launcher did."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank_flag or 0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        # Explicit, or `import deepspeed` prints an accelerator warning on stdout.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), cuda
    )


def init_distributed(info: DistInfo) -> None:
    # DeepSpeed prints op-build notices and logs through a handler bound to stdout; stdout is
    # reserved for the run summary, so both go to the library log (liblog.py).
    with liblog.library_output():
        import deepspeed  # optional dependency (the train extra)

        liblog.adopt_library_loggers()
        if info.cuda:
            torch.cuda.set_device(info.local_rank)
        else:
            _skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend="nccl" if info.cuda else "gloo")


def _skip_shm_comm_op() -> None:
    """On CPU, `deepspeed.init_distributed` JIT-compiles a shared-memory all-reduce op that only
    DeepSpeed's inference path (`inference_all_reduce`) calls. Training never uses it, yet the
    build costs a minute on a fresh machine and every later start takes its build lock: a start
    killed while holding that lock leaves a lock file on which every following start waits
    forever. Marking the op unavailable is a state DeepSpeed already handles (it falls back to
    the process group's all_reduce)."""
    import deepspeed.ops  # optional dependency (the train extra)

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def check_batch(cfg: TrainConfig, info: DistInfo) -> None:
    d = cfg.deepspeed
    product = d.micro_batch * d.grad_accum * info.world
    if d.train_batch_size is not None and d.train_batch_size != product:
        raise ConfigError(
            "deepspeed.train_batch_size",
            f"{d.train_batch_size} != micro_batch {d.micro_batch} x grad_accum "
            f"{d.grad_accum} x world size {info.world} = {product}",
        )
    if d.dtype == "fp16" and not info.cuda:
        raise ConfigError("deepspeed.dtype", "fp16 is not supported on CPU; use bf16 or fp32")


# Keys lptrain derives from typed fields; setting them in `extra` would silently disagree.
_OWNED = {
    "train_batch_size": "deepspeed.train_batch_size",
    "train_micro_batch_size_per_gpu": "deepspeed.micro_batch",
    "gradient_accumulation_steps": "deepspeed.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim",
    "scheduler": "optim (lptrain passes its own schedule)",
    "bf16": "deepspeed.dtype",
    "fp16": "deepspeed.dtype",
    "wandb": "logging.wandb (DeepSpeed's monitor logs only the lr and can kill the run)",
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    d, o = cfg.deepspeed, cfg.optim
    for key in d.extra:
        if key in _OWNED:
            raise ConfigError(f"deepspeed.extra.{key}", f"set by lptrain; use {_OWNED[key]}")
    ds: dict[str, Any] = {
        "train_batch_size": d.micro_batch * d.grad_accum * world,
        "train_micro_batch_size_per_gpu": d.micro_batch,
        "gradient_accumulation_steps": d.grad_accum,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch.optim.AdamW: deterministic on CPU, so resume and stage equality are exact.
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": d.zero_stage},
        "bf16": {"enabled": d.dtype == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": d.dtype == "fp16"},
        "steps_per_print": 10**9,  # lptrain logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if compact_optimizer(cfg):
        # `initialize` hands DeepSpeed a CompactAdamW instead; ZeRO 1-2 accept it only when
        # told (it checks a list of known optimizer classes).
        del ds["optimizer"]
        ds["zero_allow_untested_optimizer"] = True
    if o.master == "bf16-sr":
        # DeepSpeed's bf16 mode adds an fp32 master copy; lptrain casts the weights to bf16
        # itself (`initialize`) and the engine runs them as they are.
        ds["bf16"]["enabled"] = False
    return _merge(ds, d.extra)


def param_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the forward runs the parameters in: DeepSpeed's bf16 and fp16 modes cast every
    parameter (not the buffers) to 16 bits, and so does lptrain for `optim.master: bf16-sr`
    (which runs DeepSpeed in fp32 mode, `deepspeed_config`, and needs deepspeed.dtype bf16).
    `lptrain eval` and `export` rebuild the model with it (export/restore.py): the same weights
    held in fp32 would compute another loss."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        cfg.deepspeed.dtype
    ]


def compact_optimizer(cfg: TrainConfig) -> bool:
    """Whether the optimizer is lptrain's CompactAdamW (compact moments or bf16-sr master
    weights) rather than DeepSpeed's torch AdamW."""
    return cfg.optim.states != "fp32" or cfg.optim.master != "fp32"


def zero_init(cfg: TrainConfig, converter_names: list[str]) -> tuple[bool, str]:
    """Whether the model is built inside `deepspeed.zero.Init` (ZeRO-3 and
    `deepspeed.zero_init`), and why not when it is asked for but cannot be: `init.from`, QAT
    calibration and adapters read or replace whole weights outside a module's forward."""
    d = cfg.deepspeed
    if d.zero_stage != 3 or not d.zero_init:
        return False, ""
    blocking = [n for n in converter_names if n != "precision"]
    if blocking:
        return False, (
            f"model built whole on every rank, not in deepspeed.zero.Init: the {blocking[0]} "
            "converter needs whole weights"
        )
    return True, "model built inside deepspeed.zero.Init: parameters created partitioned"


def model_construction(ds_config: dict, enabled: bool):
    """The context the model is built in: `deepspeed.zero.Init` (each module's parameters are
    partitioned over the ranks as soon as the module is built, so no rank ever holds the whole
    fp32 model), or nothing. `mem_efficient_linear=False`: DeepSpeed would otherwise replace
    torch.nn.functional.linear process-wide, for good."""
    if not enabled:
        return None
    import deepspeed  # optional dependency (the train extra)

    stack = contextlib.ExitStack()
    stack.enter_context(liblog.library_output())
    stack.enter_context(
        deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False)
    )
    return stack


def universal_loaded(engine, cfg: TrainConfig) -> None:
    """Repairs after the one universal load of an elastic resume. DeepSpeed's ZeRO-3 universal
    loader (stage3.py `load_hp_checkpoint_state_from_checkpoint_dir_stage3`) gives every
    parameter group the first group's hyperparameters, so norms would get weight decay: put
    each group's own back (lr: `resume_optim`). Later loads (a non-finite reload) read this
    run's own, ordinary checkpoints."""
    groups = engine.optimizer.param_groups
    expected = param_groups(engine.module, cfg.optim.weight_decay)
    for g, e in zip(groups, expected, strict=True):
        g["weight_decay"] = e["weight_decay"]
        g["betas"], g["eps"] = tuple(cfg.optim.betas), cfg.optim.eps
    # The same loader hands one `step` tensor to every sub-group's Adam state; torch's Adam
    # increments it in place, so it would advance once per group per update and skew the bias
    # correction. Each state gets its own.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen: set[int] = set()
    for state in inner.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))
    engine._config.load_universal_checkpoint = False


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Warmup (linear from ~0) then cosine/linear decay to lr * min_lr_ratio at total_steps."""
    o = cfg.optim
    warm, floor = o.warmup_steps, o.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if o.decay == "constant" or total_steps <= warm:
            return 1.0
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if o.decay == "cosine" else 1.0 - t
        return floor + (1.0 - floor) * shape

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms' gains are exempt, and so are quantizer steps and
    offsets (`lptrain_role == "quantizer"`, lptrain.qat), which get their own group "quantizer"
    (double-rounding's ALRS scales that group's learning rate). Empty groups are left out."""
    decay, no_decay, quant, seen = [], [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if getattr(p, "lptrain_role", None) == "quantizer":
            quant.append(p)
        else:
            # ds_shape: built under deepspeed.zero.Init, a parameter is an empty partition.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": quant, "weight_decay": 0.0, "name": "quantizer"},
    ]
    return [g for g in groups if g["params"]]


def initialize(model: nn.Module, cfg: TrainConfig, ds_config: dict, total_steps: int):
    import deepspeed  # optional dependency (the train extra)

    factor = lr_lambda(cfg, total_steps)
    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = None
    if compact_optimizer(cfg):
        o = cfg.optim
        if o.master == "bf16-sr":  # parameters only: fp32 buffers (quantizer state) stay
            for p in model.parameters():
                p.data = p.data.to(param_dtype(cfg))
        optimizer = CompactAdamW(
            groups, o.lr, tuple(o.betas), o.eps, o.weight_decay, o.states, o.master, cfg.run.seed
        )
    with liblog.library_output():
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            optimizer=optimizer,
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        )
    if optimizer is not None and cfg.deepspeed.zero_stage in (1, 2):
        # blocks of the whole group buffer: the same codes and scales on any number of ranks
        optimizer.block_starts = {flat: start for flat, start, _ in flat_partitions(engine)}
    return engine, scheduler


def flat_partitions(engine) -> list[tuple[torch.Tensor, int, int]]:
    """ZeRO 1-2, per parameter group: (this rank's flat FP32 partition, the index of its first
    element in the group's flat buffer, the buffer's elements without ZeRO's padding). The
    partitions are equal slices of the padded buffer in data-parallel rank order."""
    zero = engine.optimizer
    out = []
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        rank = dist.get_rank(group=zero.real_dp_process_group[i])
        out.append((flat, rank * flat.numel(), sum(p.numel() for p in zero.bit16_groups[i])))
    return out


def regrouped_note(engine, cfg: TrainConfig) -> str | None:
    """Collective, after a checkpoint load: the line for compact states saved before
    group-aligned blocks that the load re-encoded (`CompactAdamW.regrouped`), its count summed
    over the ranks; None where no rank re-encoded any."""
    if not compact_optimizer(cfg):
        return None
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    changed = inner.regrouped
    done, changed = all_reduce([float(changed is not None), float(changed or 0)], dist.ReduceOp.SUM)
    return reshard.regrouped_note(cfg.optim.states, round(changed)) if done else None


def resume_optim(engine, cfg: TrainConfig, total_steps: int, old: dict | None) -> None:
    """After a checkpoint load (which restores the saved hyperparameters and base lr): let
    `cfg.optim` and the schedule over `total_steps` govern from the next step. `old` is the saved
    config's `optim` mapping when it differs (an allowed change), else None; then only the lr is
    recomputed, which gives the saved value back unless the run length changed."""
    sched = engine.lr_scheduler
    groups = sched.optimizer.param_groups
    o = cfg.optim
    if old is not None:
        if old["lr"] != o.lr:  # keeps any per-group lr ratio a converter may have set
            sched.base_lrs = [b * o.lr / old["lr"] for b in sched.base_lrs]
        for i, g in enumerate(groups):
            g["betas"], g["eps"] = tuple(o.betas), o.eps
            if i < 2:  # the two groups of `param_groups`: decayed matrices, then the rest
                g["weight_decay"] = o.weight_decay if i == 0 else 0.0
    factor = lr_lambda(cfg, total_steps)  # the scheduler already holds this schedule
    for g, base in zip(groups, sched.base_lrs, strict=True):
        g["initial_lr"] = base
        g["lr"] = base * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in groups]


# ---------------------------------------------------------------- step bookkeeping


def manual_nonfinite_check(cfg: TrainConfig) -> bool:
    """Stage 0 fp32 has no overflow check in DeepSpeed (ZeRO and bf16 have one): lptrain must
    compute the gradient norm and skip non-finite updates itself. bf16-sr master weights run
    DeepSpeed in its fp32 mode (`deepspeed_config`), so they are that case too."""
    d = cfg.deepspeed
    return d.zero_stage == 0 and (d.dtype == "fp32" or cfg.optim.master == "bf16-sr")


def _grad_norm(model: nn.Module) -> float:
    norms = [
        torch.linalg.vector_norm(p.grad.float()) for p in model.parameters() if p.grad is not None
    ]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _skip_update(engine) -> None:
    """Drop the grads and do the engine's bookkeeping, as ZeRO and bf16 do on a non-finite norm:
    no optimizer or scheduler step, the micro-step counter still advances (it decides the
    accumulation boundary) and the skip is counted in `engine.skipped_steps`."""
    engine.zero_grad()
    engine.micro_steps += 1
    engine.skipped_steps += 1


def micro_step(engine, manual_check: bool, before_update=None) -> float | None:
    """`engine.step()` after one micro-batch's backward. At the accumulation boundary returns
    the global gradient norm (non-finite: the update was skipped); elsewhere None.

    before_update(): called at the boundary first, when the gradients are reduced over ranks
    and not yet applied or cleared (per-layer gradient norms)."""
    boundary = engine.is_gradient_accumulation_boundary()
    if boundary and before_update is not None:
        before_update()
    if boundary and manual_check:
        norm = _grad_norm(engine.module)
        if not math.isfinite(norm):
            _skip_update(engine)
            return norm
        engine.step()
        return norm
    engine.step()
    if not boundary:
        return None
    raw = engine.get_global_grad_norm()  # None, a float or a 0-d tensor, by mode
    return float(raw) if raw is not None else float("nan")


def all_reduce(values: list[float], op) -> list[float]:
    """Reduce a few floats over all ranks (a no-op in one process)."""

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


# ---------------------------------------------------------------- per-group learning rates


def schedule_lrs(engine, step: int, scale: dict[str, float] | None = None) -> None:
    """Put lptrain's schedule (a LambdaLR) at `step` updates and set every optimizer group's
    lr to base_lr x factor(step) x scale[group name] (1 for groups not named in `scale`).

    A step function that makes several updates per training step (the multi-bit-width step,
    ALRS) calls this before each update with the same `step`, and with `step + 1` and no
    scale afterwards: the lr stays a pure function of the training step (exact on resume,
    unaffected by skipped updates), and the scheduler agrees with the plain loop's. ZeRO and
    bf16 optimizers share these group dicts with the torch optimizer they wrap."""
    sched = engine.lr_scheduler
    scale = scale or {}
    sched.last_epoch = step
    groups = engine.optimizer.param_groups
    for g, base, fn in zip(groups, sched.base_lrs, sched.lr_lambdas, strict=True):
        g["lr"] = base * fn(step) * scale.get(g.get("name"), 1.0)


@contextlib.contextmanager
def lr_probe(engine):
    """Yields a list that receives {group name or index: lr} at every torch optimizer update
    (a step pre-hook on the optimizer DeepSpeed wraps): the rates the update really used."""
    seen: list[dict[str, float]] = []
    opt = getattr(engine, "basic_optimizer", None) or engine.optimizer

    def record(optimizer, args, kwargs):
        seen.append(
            {g.get("name") or str(i): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        )

    handle = opt.register_step_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()
