"""The training loop: build, resume, step, evaluate, checkpoint, stop on a signal."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from lptrain.train import checkpoint, data, precision
from lptrain.train import engine as eng
from lptrain.train.checkpoint import Progress
from lptrain.train.config import TrainConfig, to_yaml
from lptrain.train.model import build_model, count_params
from lptrain.train.monitor import Monitor


class NonFiniteError(RuntimeError):
    """Too many non-finite steps and no (further) checkpoint reload allowed."""


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over micro-batches and ranks, unscaled
    grad_norm: float
    skipped: bool


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    engine: object
    model: torch.nn.Module
    train_src: data.BatchSource
    val: list[torch.Tensor]
    layout: data.Layout
    total_steps: int
    ckpt_dir: Path
    config_hash: str
    manual_nonfinite_check: bool  # stage 0 fp32: DeepSpeed does not skip non-finite steps


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the step boundary."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.raised:  # a second signal: stop now
            raise KeyboardInterrupt
        self.raised = True


def _all_reduce(values: list[float], op) -> list[float]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    # NCCL reduces only CUDA tensors; gloo only CPU ones.
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def total_steps(cfg: TrainConfig, layout: data.Layout) -> int:
    limits = [cfg.run.max_steps] if cfg.run.max_steps is not None else []
    if cfg.run.max_tokens is not None:
        limits.append(math.ceil(cfg.run.max_tokens / (layout.global_batch * cfg.data.block_size)))
    return min(limits)


def setup(
    cfg: TrainConfig, ds_config: dict, recipe, info: eng.DistInfo, run_dir: Path, say
) -> Session:
    layout = data.Layout(cfg.deepspeed.micro_batch, cfg.deepspeed.grad_accum, info.world, info.rank)
    tok = data.load_tokenizer(cfg.data.tokenizer)
    blocks = data.load_blocks(cfg.data, tok, info.rank == 0, dist.barrier)
    split = data.split(len(blocks), cfg.data.val_fraction)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, tok.vocab_size, cfg.data.block_size)
    model = precision.convert(model, cfg.precision, recipe, cfg.run.seed, info.rank)
    precision.set_amax_reduce(model, cfg.precision, info.world)
    say(
        f"model: {count_params(model) / 1e6:.2f}M parameters, precision {cfg.precision.recipe!r}, "
        f"{len(split.train)} train / {len(split.val)} val blocks of {cfg.data.block_size} tokens"
    )
    steps = total_steps(cfg, layout)
    engine, _ = eng.initialize(model, cfg, ds_config, steps)
    # Dropout and stochastic rounding draw from per-rank streams from here on.
    torch.manual_seed(cfg.run.seed * 1000003 + info.rank)
    stage0_fp32 = cfg.deepspeed.zero_stage == 0 and cfg.deepspeed.dtype == "fp32"
    return Session(
        cfg=cfg,
        engine=engine,
        model=model,
        train_src=data.BatchSource(blocks, split.train, cfg.run.seed),
        val=data.val_batches(blocks, split, layout, cfg.run.eval_batches),
        layout=layout,
        total_steps=steps,
        ckpt_dir=run_dir / "checkpoints",
        config_hash=hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16],
        manual_nonfinite_check=stage0_fp32,
    )


def _grad_norm(s: Session) -> float:
    """Stage 0 fp32: DeepSpeed reports no norm there, so compute it from the reduced grads."""
    norms = [
        torch.linalg.vector_norm(p.grad.float()) for p in s.model.parameters() if p.grad is not None
    ]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _skip_update(engine) -> None:
    """Stage 0 fp32 has no overflow check: drop the grads and do the engine's bookkeeping.

    Mirrors what ZeRO and bf16 do on a non-finite norm: no optimizer or scheduler step, the
    micro-step counter still advances (it decides the accumulation boundary) and the skip is
    counted in `engine.skipped_steps`.
    """
    engine.zero_grad()
    engine.micro_steps += 1
    engine.skipped_steps += 1


def train_step(s: Session, p: Progress) -> StepResult:
    e = s.engine
    loss_sum, grad_norm = 0.0, float("nan")
    for m in range(s.layout.accum):
        batch = s.train_src.batch(s.layout.start(p.sample_index, m), s.layout.micro)
        batch = batch.to(e.device)  # the engine does not move inputs; a no-op on CPU
        loss = e(batch)
        loss_sum += float(loss.detach())
        e.backward(loss)
        if e.is_gradient_accumulation_boundary() and s.manual_nonfinite_check:
            grad_norm = _grad_norm(s)
            if not math.isfinite(grad_norm):
                _skip_update(e)
                continue
        e.step()
    if not s.manual_nonfinite_check:
        raw = e.get_global_grad_norm()
        grad_norm = float(raw) if raw is not None else float("nan")
    (loss_total,) = _all_reduce([loss_sum], dist.ReduceOp.SUM)
    mean_loss = loss_total / (s.layout.accum * s.layout.world)
    skipped = not (math.isfinite(mean_loss) and math.isfinite(grad_norm))
    return StepResult(mean_loss, grad_norm, skipped)


@torch.no_grad()
def evaluate(s: Session) -> float:
    s.engine.eval()
    total = sum(float(s.engine(b.to(s.engine.device))) for b in s.val)
    s.engine.train()
    (total,) = _all_reduce([total], dist.ReduceOp.SUM)
    return total / (len(s.val) * s.layout.world)


def _save(s: Session, p: Progress, say) -> None:
    path = checkpoint.save(
        s.engine, s.model, s.ckpt_dir, p, s.cfg.checkpoint.keep_last, s.config_hash
    )
    say(f"checkpoint: {path}")


def _reload(s: Session, p: Progress, say) -> Progress:
    """Back to the last good checkpoint, keeping the data position past the bad batches."""
    found = checkpoint.find("auto", s.ckpt_dir)
    if found is None or p.reloads >= s.cfg.run.max_reloads:
        why = "no checkpoint to reload" if found is None else f"{p.reloads} reloads already"
        raise NonFiniteError(
            f"{s.cfg.run.nonfinite_limit} consecutive non-finite steps at step {p.step} and {why}"
        )
    good = checkpoint.load(s.engine, s.model, *found)
    say(f"non-finite: reloaded {found[1]} (reload {p.reloads + 1}); skipping the bad batches")
    return replace(good, sample_index=p.sample_index, skipped=p.skipped, reloads=p.reloads + 1)


class Throughput:
    """Tokens per second since the previous call (all ranks' tokens)."""

    def __init__(self, tokens: int):
        self.t, self.tokens = time.monotonic(), tokens

    def rate(self, tokens: int) -> float:
        now = time.monotonic()
        out = (tokens - self.tokens) / max(now - self.t, 1e-9)
        self.t, self.tokens = now, tokens
        return out


def _train_row(s: Session, p: Progress, r: StepResult, meter: Throughput) -> dict:
    return {
        "step": p.step,
        "loss": r.loss,
        "lr": s.engine.get_lr()[0],
        "grad_norm": r.grad_norm,
        "tokens_per_s": meter.rate(p.tokens),
        "tokens": p.tokens,
        "skipped_steps": p.skipped,
    }


def run(s: Session, monitor: Monitor, say) -> Progress:
    cfg, G = s.cfg, s.layout.global_batch
    p = Progress()
    found = checkpoint.find(cfg.checkpoint.resume, s.ckpt_dir)
    if found is not None:
        p = checkpoint.load(s.engine, s.model, *found)
        say(f"resumed from {found[0] / found[1]} at step {p.step}")
    monitor.start_at(p.step)
    stop, streak, meter = StopFlag(), 0, Throughput(p.tokens)
    while p.step < s.total_steps:
        r = train_step(s, p)
        streak = streak + 1 if r.skipped else 0
        p = replace(
            p,
            step=p.step + 1,
            sample_index=p.sample_index + G,
            tokens=p.tokens + G * cfg.data.block_size,
            skipped=p.skipped + r.skipped,
        )
        if p.step % cfg.logging.interval == 0 or p.step == s.total_steps:
            monitor.log(_train_row(s, p, r, meter))
        if cfg.run.nonfinite_limit and streak >= cfg.run.nonfinite_limit:
            p, streak = _reload(s, p, say), 0
            continue
        if cfg.run.eval_interval and (
            p.step % cfg.run.eval_interval == 0 or p.step == s.total_steps
        ):
            monitor.log({"step": p.step, "val_loss": evaluate(s)})
        (stopping,) = _all_reduce([float(stop.raised)], dist.ReduceOp.MAX)
        stopping = stopping or p.step == cfg.run.stop_at_step
        periodic = cfg.checkpoint.interval and p.step % cfg.checkpoint.interval == 0
        final = p.step == s.total_steps and cfg.checkpoint.save_final
        if periodic or final or stopping:
            _save(s, p, say)
        if stopping:
            say(f"stopped at step {p.step}; the same command resumes (checkpoint.resume=auto)")
            break
    return p


def describe_config(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    if not precision.is_high_precision(cfg.precision):
        d["precision_resolved"] = precision.recipe_dict(cfg.precision)
    return d
