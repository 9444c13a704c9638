"""The training loop: build, resume, step, evaluate, checkpoint, stop on a signal.

`run` is handed the step function (`train_step` by default; converters may wrap it, e.g. a
multi-precision step); it never reaches into DeepSpeed (engine.py owns that).
"""

from __future__ import annotations

import hashlib
import math
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from lptrain.train import checkpoint, converters, data
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
    extra: dict = field(default_factory=dict)  # more metrics for the row (a wrapped step's)


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
    converters: list
    step_fn: Callable[["Session", Progress], "StepResult"]


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


def total_steps(cfg: TrainConfig, layout: data.Layout) -> int:
    limits = [cfg.run.max_steps] if cfg.run.max_steps is not None else []
    if cfg.run.max_tokens is not None:
        limits.append(math.ceil(cfg.run.max_tokens / (layout.global_batch * cfg.data.block_size)))
    return min(limits)


def setup(
    cfg: TrainConfig,
    ds_config: dict,
    convs: list,
    tok: data.Tokenizer,
    info: eng.DistInfo,
    run_dir: Path,
    say,
) -> Session:
    layout = data.Layout(cfg.deepspeed.micro_batch, cfg.deepspeed.grad_accum, info.world, info.rank)
    blocks = data.load_blocks(cfg.data, tok, info.rank == 0, dist.barrier)
    split = data.split(len(blocks), cfg.data.val_fraction)
    train_src = data.BatchSource(blocks, split.train, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, tok.vocab_size, cfg.data.block_size)
    ctx = converters.ConvertContext(
        cfg.run.seed, info.rank, info.world, say,
        # The first n micro-batches of all ranks together: the same samples on every rank and
        # for any split of the same global batch over ranks (1 x 8 or 2 x 4 calibrate alike).
        sample=lambda n=1: train_src.batch(0, layout.micro * layout.world * n),
        vocab_size=tok.vocab_size,
    )  # fmt: skip
    model = converters.apply(model, convs, ctx)
    say(
        f"model: {count_params(model) / 1e6:.2f}M parameters, precision {cfg.precision.recipe!r}, "
        f"{len(split.train)} train / {len(split.val)} val blocks of {cfg.data.block_size} tokens"
    )
    steps = total_steps(cfg, layout)
    engine, _ = eng.initialize(model, cfg, ds_config, steps)
    # Dropout and stochastic rounding draw from per-rank streams from here on.
    torch.manual_seed(cfg.run.seed * 1000003 + info.rank)
    return Session(
        cfg=cfg,
        engine=engine,
        model=model,
        train_src=train_src,
        val=data.val_batches(blocks, split, layout, cfg.run.eval_batches),
        layout=layout,
        total_steps=steps,
        ckpt_dir=run_dir / "checkpoints",
        config_hash=hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16],
        manual_nonfinite_check=eng.manual_nonfinite_check(cfg),
        converters=convs,
        step_fn=converters.wrap_step(train_step, convs),
    )


def train_step(s: Session, p: Progress) -> StepResult:
    """One optimizer step: `accum` micro-batches of forward and backward, then the update."""
    e = s.engine
    loss_sum, grad_norm = 0.0, float("nan")
    for m in range(s.layout.accum):
        batch = s.train_src.batch(s.layout.start(p.sample_index, m), s.layout.micro)
        batch = batch.to(e.device)  # the engine does not move inputs; a no-op on CPU
        loss = e(batch)
        loss_sum += float(loss.detach())
        e.backward(loss)
        norm = eng.micro_step(e, s.manual_nonfinite_check)
        if norm is not None:
            grad_norm = norm
    (loss_total,) = eng.all_reduce([loss_sum], dist.ReduceOp.SUM)
    mean_loss = loss_total / (s.layout.accum * s.layout.world)
    skipped = not (math.isfinite(mean_loss) and math.isfinite(grad_norm))
    return StepResult(mean_loss, grad_norm, skipped)


@torch.no_grad()
def evaluate(s: Session) -> float:
    s.engine.eval()
    total = sum(float(s.engine(b.to(s.engine.device))) for b in s.val)
    s.engine.train()
    (total,) = eng.all_reduce([total], dist.ReduceOp.SUM)
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
    converters.after_step(s.model, s.converters, good.step)  # weights changed: drop derived copies
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
        **r.extra,
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
        r = s.step_fn(s, p)
        streak = streak + 1 if r.skipped else 0
        p = replace(
            p,
            step=p.step + 1,
            sample_index=p.sample_index + G,
            tokens=p.tokens + G * cfg.data.block_size,
            skipped=p.skipped + r.skipped,
        )
        converters.after_step(s.model, s.converters, p.step)
        if p.step % cfg.logging.interval == 0 or p.step == s.total_steps:
            monitor.log(_train_row(s, p, r, meter))
        if cfg.run.nonfinite_limit and streak >= cfg.run.nonfinite_limit:
            p, streak = _reload(s, p, say), 0
            continue
        if cfg.run.eval_interval and (
            p.step % cfg.run.eval_interval == 0 or p.step == s.total_steps
        ):
            monitor.log({"step": p.step, "val_loss": evaluate(s)})
        (stopping,) = eng.all_reduce([float(stop.raised)], dist.ReduceOp.MAX)
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
    d = cfg.to_dict()
    resolved = converters.recipe_dict(cfg)
    if resolved is not None:
        d["precision_resolved"] = resolved
    return d
