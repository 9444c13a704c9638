"""The training loop: build, resume, step, evaluate, checkpoint, stop on a signal.

`run` is handed the step function (`step.train_step`, or bit switching's JointStep around it);
it never reaches into DeepSpeed (lptrain/distributed/engine.py owns that).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from lptrain.checkpoint import base as bases
from lptrain.checkpoint import elastic, store
from lptrain.checkpoint.resume import Plan
from lptrain.checkpoint.store import Progress
from lptrain.config.precision import is_high_precision, recipe_dict, resolve_recipe
from lptrain.config.schema import TrainConfig, to_yaml
from lptrain.data import dataset
from lptrain.distributed import engine as eng
from lptrain.models import converters
from lptrain.models.bitswitch import BitSwitchConverter
from lptrain.models.decoder import build_model, count_params
from lptrain.observe import Monitoring, check_model
from lptrain.observe.layers import key_count_line
from lptrain.observe.metrics import Monitor
from lptrain.trainer.bitswitch import JointStep
from lptrain.trainer.step import StepResult, train_step
from lptrain.trainer.stop import Signals


class NonFiniteError(RuntimeError):
    """Too many non-finite steps and no (further) checkpoint reload allowed."""


@dataclass
class Session:
    """Everything the loop needs, built once by `setup`."""

    cfg: TrainConfig
    engine: object
    model: torch.nn.Module
    train_src: dataset.BatchSource
    val: list[tuple[torch.Tensor, int]]  # this rank's validation batches (dataset.val_batches)
    layout: dataset.Layout
    total_steps: int
    ckpt_dir: Path
    config_yaml: str  # saved into every checkpoint: what a resume compares against
    manual_nonfinite_check: bool  # stage 0 fp32: DeepSpeed does not skip non-finite steps
    converters: list
    step_fn: Callable[["Session", Progress], "StepResult"]
    monitoring: Monitoring | None = None  # per-layer numerics, spikes, the precision guard


def total_steps(cfg: TrainConfig, layout: dataset.Layout) -> int:
    limits = [cfg.run.max_steps] if cfg.run.max_steps is not None else []
    if cfg.run.max_tokens is not None:
        limits.append(math.ceil(cfg.run.max_tokens / (layout.global_batch * cfg.data.block_size)))
    return min(limits)


def setup(
    cfg: TrainConfig,
    ds_config: dict,
    convs: list,
    tok: dataset.Tokenizer,
    info: eng.DistInfo,
    run_dir: Path,
    say,
) -> Session:
    layout = dataset.Layout(
        cfg.deepspeed.micro_batch, cfg.deepspeed.grad_accum, info.world, info.rank
    )
    blocks = dataset.load_blocks(cfg.data, tok, info.rank == 0, dist.barrier)
    split = dataset.split(len(blocks), cfg.data.val_fraction)
    train_src = dataset.BatchSource(blocks, split.train, cfg.run.seed)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    partitioned, why = eng.zero_init(cfg, [c.name for c in convs])
    if why:
        say(why)
    construction = eng.model_construction(ds_config, partitioned)
    model = build_model(cfg.model, tok.vocab_size, cfg.data.block_size, construction)
    ctx = converters.ConvertContext(
        cfg.run.seed, info.rank, info.world, say,
        # The first n micro-batches of all ranks together: the same samples on every rank and
        # for any split of the same global batch over ranks (1 x 8 or 2 x 4 calibrate alike).
        sample=lambda n=1: train_src.batch(0, layout.micro * layout.world * n),
        vocab_size=tok.vocab_size,
    )  # fmt: skip
    model = converters.apply(model, convs, ctx)
    check_model(cfg, model)
    say(
        f"model: {count_params(model) / 1e6:.2f}M parameters, precision {cfg.precision.recipe!r}, "
        f"{len(split.train)} train / {len(split.val)} val blocks of {cfg.data.block_size} tokens"
    )
    steps = total_steps(cfg, layout)
    engine, _ = eng.initialize(model, cfg, ds_config, steps)
    monitoring = make_monitoring(
        cfg, model, blocks, split, layout, engine.device, tok.vocab_size, engine.optimizer
    )
    if monitoring.moments_off:
        say(f"monitor: no optimizer-state statistics: {monitoring.moments_off}")
    if cfg.monitor.interval:  # W&B suggests at most ~10,000 keys per project: say the cost
        m = monitoring
        say(key_count_line(m.layers, m.trained, cfg.monitor, m.shadows, m.moment_key_count()))
    # Dropout and stochastic rounding draw from per-rank streams from here on.
    torch.manual_seed(cfg.run.seed * 1000003 + info.rank)
    return Session(
        cfg=cfg,
        engine=engine,
        model=model,
        train_src=train_src,
        val=dataset.val_batches(blocks, eval_rows(cfg, split, layout, say), layout),
        layout=layout,
        total_steps=steps,
        ckpt_dir=run_dir / "checkpoints",
        config_yaml=to_yaml(cfg),
        manual_nonfinite_check=eng.manual_nonfinite_check(cfg),
        converters=convs,
        step_fn=monitoring.wrap(step_function(convs)),
        monitoring=monitoring,
    )


def make_monitoring(
    cfg: TrainConfig, model, blocks, split, layout, device, vocab_size: int, optimizer=None
) -> Monitoring:
    """The monitoring, with its probe batch: rank 0's first validation batch on every rank (a
    fixed batch outside the training order, so the data stream is untouched)."""
    probe = None
    if cfg.monitor.fidelity and cfg.monitor.interval:
        first = dataset.Layout(layout.micro, layout.accum, layout.world, 0)
        probe = dataset.val_batches(blocks, split.val[: layout.micro], first)[0][0].to(device)
    base = None if is_high_precision(cfg.precision) else resolve_recipe(cfg.precision)
    return Monitoring(
        cfg, model, layout.world, probe, base, vocab_size=vocab_size, optimizer=optimizer
    )


def step_function(convs: list):
    """`train_step`, run at every bit-width by a bit-switching run's JointStep."""
    step_fn = train_step
    for conv in convs:
        if isinstance(conv, BitSwitchConverter):
            step_fn = JointStep(step_fn, conv)
    return step_fn


def eval_rows(cfg: TrainConfig, split: dataset.Split, layout: dataset.Layout, say) -> np.ndarray:
    """The validation blocks every evaluation reads, each once: the first `run.eval_batches`
    micro-batches of every rank, or the whole split when it holds fewer blocks (said once: the
    setting then asks for more than there is; it used to wrap and count blocks twice)."""
    want = cfg.run.eval_batches * layout.micro * layout.world
    n_val = len(split.val)
    if cfg.run.eval_interval and want > n_val:
        ranks = f" x {layout.world} ranks" if layout.world > 1 else ""
        say(
            f"warning: run.eval_batches: {cfg.run.eval_batches} x {layout.micro} blocks{ranks} = "
            f"{want} exceed the {n_val} validation blocks: each evaluation reads those {n_val} once"
        )
    return split.val[:want]


@torch.no_grad()
def evaluate(s: Session) -> float:
    """The validation loss, as `lptrain eval` computes it (dataset.mean_loss)."""
    s.engine.eval()
    loss = dataset.mean_loss(
        lambda tokens: s.engine(tokens.to(s.engine.device)),
        s.val,
        lambda values: eng.all_reduce(values, dist.ReduceOp.SUM),
    )
    s.engine.train()
    return loss


def _save(s: Session, p: Progress, monitor: Monitor, say) -> None:
    # The event counts ride along so that a resume continues them (W&B's events/<kind>).
    extra = {"event_counts": monitor.event_counts_state()}
    if s.monitoring is not None:
        extra["monitoring"] = s.monitoring.state_dict()
    path = store.save(
        s.engine,
        s.model,
        s.ckpt_dir,
        p,
        s.cfg.checkpoint.keep_last,
        s.config_yaml,
        extra,
        base_dir=s.ckpt_dir.parent / bases.DIR,
    )
    say(f"checkpoint: {path}")


def _load(s: Session, found: store.Found, say, reset_quantizers: bool = False) -> Progress:
    """Load a checkpoint, its precision-guard fallbacks put in place first (they decide which
    quantizer-state keys the layers have)."""
    if s.monitoring is not None:
        s.monitoring.load_state_dict(store.peek(found).get("monitoring"))
    p = store.load(s.engine, s.model, found, reset_quantizers=reset_quantizers)
    note = eng.regrouped_note(s.engine, s.cfg)  # compact states saved before 507c4ec
    if note is not None:
        say(note)
    return p


def _resume(s: Session, start: Plan, monitor: Monitor, say) -> Progress:
    if start.universal:  # saved on another world size (checkpoint/elastic.py)
        extra = store.peek_rank0(start.source)
        if s.monitoring is not None:
            s.monitoring.load_state_dict(extra.get("monitoring"))
        p = elastic.load(s.engine, s.model, start.source, s.ckpt_dir, s.cfg, say)
    else:
        extra = store.peek(start.source)
        p = _load(s, start.source, say, start.reset_quantizers)
    monitor.restore_event_counts(extra.get("event_counts", {}))
    eng.resume_optim(s.engine, s.cfg, s.total_steps, start.saved_section("optim"))
    if s.cfg.precision.guard.reset:
        _reset_guard(s, say)
    say(f"resumed from {start.source.path} at step {p.step}")
    monitor.event({"kind": "resume", "step": p.step, "checkpoint": start.source.tag})
    return p


def _reset_guard(s: Session, say) -> None:
    """`precision.guard.reset` on a resume: the checkpoint's fallbacks are loaded (its state
    keys need them), then dropped."""
    n = s.monitoring.reset_guard() if s.monitoring is not None else 0
    if n:
        say(f"precision.guard.reset: {n} layer(s) back on the run's recipe")
    else:
        say("warning: precision.guard.reset: the checkpoint holds no guard fallbacks to reset")


def _reload(s: Session, p: Progress, start: Plan | None, monitor: Monitor, say) -> Progress:
    """Back to the last good checkpoint, keeping the data position past the bad batches."""
    found, _ = store.newest_verified(s.ckpt_dir)
    if found is None or p.reloads >= s.cfg.run.max_reloads:
        why = "no checkpoint to reload" if found is None else f"{p.reloads} reloads already"
        raise NonFiniteError(
            f"{s.cfg.run.nonfinite_limit} consecutive non-finite steps at step {p.step} and {why}"
        )
    # The checkpoint resumed from predates an allowed precision change: load it the same way.
    reset = start is not None and start.reset_quantizers and found.path == start.source.path
    # Keep the fallbacks the guard made since that checkpoint (and its spike memory): put the
    # checkpoint's recipes in place to load its state, then switch the layers back.
    keep = s.monitoring.state_dict() if s.monitoring is not None else None
    good = _load(s, found, say, reset)
    if keep is not None:
        s.monitoring.load_state_dict(keep)
    converters.after_step(s.model, s.converters, good.step)  # weights changed: drop derived copies
    eng.resume_optim(s.engine, s.cfg, s.total_steps, None)
    monitor.rewind(good.step)
    say(f"non-finite: reloaded {found.tag} (reload {p.reloads + 1}); skipping the bad batches")
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
    row = {
        "step": p.step,
        "loss": r.loss,
        "lr": s.engine.get_lr()[0],
        "grad_norm": r.grad_norm,
        "tokens_per_s": meter.rate(p.tokens),
        "tokens": p.tokens,
        "skipped_steps": p.skipped,
        **r.extra,
    }
    if s.monitoring is not None:
        per_step = s.layout.global_batch * s.cfg.data.block_size
        row.update(s.monitoring.step_metrics(row["tokens_per_s"], per_step))
    return row


def _monitor_step(s: Session, p: Progress, r: StepResult, monitor: Monitor) -> None:
    """The step's per-layer row and events (spikes, guard fallbacks, a skipped update)."""
    if r.skipped:
        monitor.event({"kind": "skip", "step": p.step, "loss": r.loss, "grad_norm": r.grad_norm})
    if s.monitoring is None:
        return
    row, events = s.monitoring.after_step(p.step, r)
    if row is not None:
        monitor.log_layers(row)
    monitor.events(events)  # one W&B alert per kind for the step, not one per layer


def run(
    s: Session,
    monitor: Monitor,
    say,
    start: Plan | None = None,
    stop: Signals | None = None,
) -> Progress:
    """Train from `start` (resume.plan's decision; None: from scratch) to the end, or until a
    signal in `stop` asks to save and exit."""
    cfg, G = s.cfg, s.layout.global_batch
    has_source = start is not None and start.source is not None
    if not has_source and cfg.precision.guard.reset:
        say("warning: precision.guard.reset: a run from scratch has no guard fallbacks to reset")
    p = _resume(s, start, monitor, say) if has_source else Progress()
    monitor.start_at(p.step)
    stop = stop or Signals()
    stop.loop()  # from here a signal means: save at the end of this step
    streak, meter = 0, Throughput(p.tokens)
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
        _monitor_step(s, p, r, monitor)
        if p.step % cfg.logging.interval == 0 or p.step == s.total_steps:
            monitor.log(_train_row(s, p, r, meter))
        if cfg.run.nonfinite_limit and streak >= cfg.run.nonfinite_limit:
            bad_step, p, streak = p.step, _reload(s, p, start, monitor, say), 0
            monitor.event({"kind": "reload", "step": bad_step, "to_step": p.step})
            continue
        if cfg.run.eval_interval and (
            p.step % cfg.run.eval_interval == 0 or p.step == s.total_steps
        ):
            monitor.log({"step": p.step, "val_loss": evaluate(s)})
        (stopping,) = eng.all_reduce([float(stop.requested)], dist.ReduceOp.MAX)
        stopping = stopping or p.step == cfg.run.stop_at_step
        periodic = cfg.checkpoint.interval and p.step % cfg.checkpoint.interval == 0
        final = p.step == s.total_steps and cfg.checkpoint.save_final
        if periodic or final or stopping:
            _save(s, p, monitor, say)
        if stopping:
            say(f"stopped at step {p.step}; the same command resumes (checkpoint.resume=auto)")
            break
    for line in s.monitoring.summary_lines() if s.monitoring is not None else ():
        say(line)
    return p


def describe_config(cfg: TrainConfig) -> dict:
    d = cfg.to_dict()
    resolved = recipe_dict(cfg)
    if resolved is not None:
        d["precision_resolved"] = resolved
    return d
