"""`Monitoring`: what the trainer does around each step to watch its numerics.

    step_fn = monitoring.wrap(step_fn)   # statistics windows and a weight snapshot around the
                                         # steps that need them
    monitoring.before_update()           # from the step, at the accumulation boundary: grads
    row, events = monitoring.after_step(step, result)   # reduce, score, guard, fidelity

A step collects when it is a monitoring step (every `monitor.interval` steps between
`start_step` and `end_step`, or a statistic's own `monitor.schedule`: the layers.jsonl row) or
a guard check. Nothing here changes what
training computes: statistics are read off the quantizers, norms off the weights and gradients,
and the fidelity probe runs in eval mode (fidelity.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from lptrain.config.precision import resolve_overrides
from lptrain.config.schema import MonitorConfig, StatSchedule, TrainConfig
from lptrain.errors import ConfigError
from lptrain.nn import Linear, stats_window
from lptrain.observe import layers as L
from lptrain.observe import perf, weights
from lptrain.observe.fidelity import gradient_fidelity
from lptrain.observe.guard import PrecisionGuard
from lptrain.observe.guard import check as check_guard
from lptrain.observe.spikes import SpikeDetector
from lptrain.optim import CompactAdamW
from lptrain.optim.states import quantization_metrics


@dataclass(frozen=True)
class Plan:
    layers: bool  # a per-layer row this step
    guard: bool  # a guard check this step
    stats: tuple[str, ...] = ()  # the statistics of monitor.stats due this step
    grad_norm: bool = False
    update_ratio: bool = False
    fidelity: bool = False


def due(m: MonitorConfig, name: str, step: int) -> bool:
    """Whether `name` (a statistic, grad_norm, update_ratio or fidelity) is logged at `step`:
    every `interval` steps from `start_step` to `end_step`, its `monitor.schedule` entry's
    where that sets them, `monitor`'s otherwise. `monitor.interval: 0` turns every row off."""
    if not m.interval:
        return False
    s = m.schedule.get(name, StatSchedule())
    interval = m.interval if s.interval is None else s.interval
    start = m.start_step if s.start_step is None else s.start_step
    end = m.end_step if s.end_step is None else s.end_step
    return start <= step and (end is None or step <= end) and step % interval == 0


def plan_rows(m: MonitorConfig, step: int) -> Plan:
    """What the per-layer row of `step` holds (no guard check: `Monitoring.plan` adds it)."""
    stats = tuple(s for s in m.stats if due(m, s, step))
    weights = {k: getattr(m, k) and due(m, k, step) for k in ("grad_norm", "update_ratio")}
    fidelity = m.fidelity and due(m, "fidelity", step)
    return Plan(bool(stats) or any(weights.values()) or fidelity, False, stats,
                fidelity=fidelity, **weights)  # fmt: skip


@dataclass
class _Pending:
    step: int
    plan: Plan
    stats: dict
    before: dict | None


def check(cfg: TrainConfig) -> None:
    """What can be checked from the config alone, before any heavy work: the guard's fallback
    chain and the shadow recipes."""
    check_guard(cfg)
    L.shadow_recipes(cfg)


def check_model(cfg: TrainConfig, model: nn.Module) -> None:
    """The layer globs that are in use match at least one layer of the converted model (call
    before the heavy start-up work)."""
    if cfg.monitor.interval:
        names = list(L.linear_layers(model, ["*"]))
        L.require_match("monitor.layers", cfg.monitor.layers, names, "linear layer")
    if cfg.precision.guard.enabled:
        names = [n for n, m in model.named_modules() if isinstance(m, Linear)]
        if not names:  # an fp32/bf16 recipe converts nothing: there is no precision to guard
            raise ConfigError(
                "precision.guard.enabled",
                f"precision.recipe {cfg.precision.recipe} quantizes no layer: the guard would "
                "watch nothing (enable it with a low-precision recipe)",
            )
        L.require_match("precision.guard.layers", cfg.precision.guard.layers, names,
                        "lptrain layer")  # fmt: skip


def _compact_optimizer(optimizer) -> CompactAdamW | None:
    """The CompactAdamW inside DeepSpeed's optimizer wrappers (each keeps it as `.optimizer`)."""
    while optimizer is not None and not isinstance(optimizer, CompactAdamW):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _moment_params(cfg: TrainConfig, trained: dict, optimizer):
    """(the CompactAdamW, `<layer>/<param>` -> parameter whose moments it stores, why there are
    none) for `monitor.optim_states`. The statistics are per tensor the optimizer holds: only
    where it holds the layers' own parameters, not DeepSpeed's flat partitions (ZeRO 1-3, or
    the fp32 copies of deepspeed.dtype bf16/fp16 without optim.master bf16-sr)."""
    want = cfg.monitor.optim_states
    if want is False or not cfg.monitor.interval or cfg.optim.states == "fp32":
        return None, {}, None
    opt = _compact_optimizer(optimizer)
    held = {id(p) for p in opt._params()} if opt is not None else set()
    moments = {
        f"{name}/{pname}": p
        for name, layer in trained.items()
        for pname, p in layer.named_parameters(recurse=False)
        if id(p) in held
    }
    if moments:
        return opt, moments, None
    why = (
        "the optimizer holds DeepSpeed's flat partitions, not the layers' parameters "
        f"(deepspeed.zero_stage {cfg.deepspeed.zero_stage}, dtype {cfg.deepspeed.dtype}): "
        "per-layer moment statistics need zero_stage 0 with dtype fp32, or optim.master bf16-sr"
    )
    if want:
        raise ConfigError("monitor.optim_states", why)
    return None, {}, why


class Monitoring:
    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        world: int,
        probe: torch.Tensor | None = None,
        guard_base=None,
        vocab_size: int | None = None,
        optimizer=None,
    ):
        self.cfg = cfg.monitor
        self.model = model
        self.world = world
        self.probe = probe
        self.layers = L.linear_layers(model, self.cfg.layers)
        # Weight metrics (gradient norm, update ratio, fidelity) for the weights that train: a
        # base frozen under adapters has none, the recipe layer inside an L4Q or stored-
        # quantized LoRA layer holds no weight at all (its statistics are still collected).
        self.trained = {
            n: m for n, m in self.layers.items() if m.weight is not None and m.weight.requires_grad
        }
        g = cfg.precision.guard
        # Built for every quantized run, enabled or not: its fallbacks are state that a resume
        # keeps and every checkpoint records (guard.py).
        overrides = resolve_overrides(cfg.precision) if guard_base else ()
        self.guard = PrecisionGuard(g, guard_base, overrides) if guard_base else None
        # The warmup's bound: the loss of a uniform guess over the vocabulary (spikes.py).
        bound = math.log(vocab_size) if vocab_size else math.inf
        self.spikes = SpikeDetector(self.cfg.spike, bound)
        self.per_token = perf.flops_per_token(model, cfg.data.block_size)
        self.shadows = L.shadow_recipes(cfg)
        self.optimizer, self.moments, self.moments_off = _moment_params(
            cfg, self.trained, optimizer
        )
        self._armed = False
        self._norms: dict[str, float] = {}
        self._pending: _Pending | None = None

    # -- scheduling ---------------------------------------------------------------------------

    def plan(self, step: int) -> Plan:
        rows = plan_rows(self.cfg, step)
        return replace(rows, guard=self.guard is not None and self.guard.due(step))

    def _stat_layers(self, plan: Plan) -> dict:
        """The lptrain layers whose statistics this step needs (recipes change under the guard)."""
        q = L.quantizing(dict(self.model.named_modules()))
        want = {}
        if plan.stats:
            want.update({n: m for n, m in q.items() if n in self.layers})
        if plan.guard:
            want.update({n: m for n, m in q.items() if self.guard.watches(n)})
        return want

    # -- around the step ----------------------------------------------------------------------

    def wrap(self, step_fn: Callable) -> Callable:
        def monitored(s, p):
            step = p.step + 1
            plan = self.plan(step)
            if not (plan.layers or plan.guard):
                return step_fn(s, p)
            before = weights.snapshot(self.trained) if plan.update_ratio else None
            self._armed = plan.grad_norm
            want = self._stat_layers(plan)
            shadows = {n: self.shadows for n in want if plan.stats and n in self.layers}
            if self.moments:  # statistics of this step's update only (a skipped one has none)
                self.optimizer.moment_stats = {}
                self.optimizer.record_moments = plan.layers
            try:
                with stats_window(want, shadows, plan.stats) as stats:
                    result = step_fn(s, p)
            finally:
                self._armed = False
                if self.moments:
                    self.optimizer.record_moments = False
            self._pending = _Pending(step, plan, stats, before)
            return result

        return monitored

    def before_update(self) -> None:
        """Called by the step between the last backward and the optimizer update."""
        if self._armed:
            self._norms = weights.grad_norms(self.trained)

    def after_step(self, step: int, result) -> tuple[dict | None, list[dict]]:
        """(the layers.jsonl row or None, events) once step `step` is done."""
        events = self.spikes.update(step, result.loss)
        pending, self._pending = self._pending, None
        if pending is None or pending.step != step:
            return None, events
        stats, shadows = L.split_shadows(L.reduce_over_ranks(pending.stats))
        row = self._layer_row(step, pending, stats, shadows) if pending.plan.layers else None
        if pending.plan.guard and not result.skipped:
            q = L.quantizing(dict(self.model.named_modules()))
            events += self.guard.check(step, stats, q)
        return row, events

    def _layer_row(self, step: int, pending: _Pending, stats: dict, shadows: dict) -> dict:
        q = L.quantizing(dict(self.model.named_modules()))
        wanted = list(pending.plan.stats)
        row = {"step": step, **L.quant_metrics(stats, wanted, q)}
        by_name = {r.name: r for r in self.shadows}
        row.update(L.shadow_metrics(shadows, wanted, q, by_name))
        for name, norm in self._norms.items():
            row[f"grad/{name}/norm"] = norm
        self._norms = {}
        if pending.before is not None:
            for name, r in weights.update_ratios(self.trained, pending.before).items():
                row[f"weight/{name}/update_ratio"] = r
        if pending.plan.fidelity and self.probe is not None and self.trained:
            for name, (cos, align) in gradient_fidelity(
                self.model, self.probe, self.trained
            ).items():
                row[f"grad/{name}/cosine"] = cos
                row[f"grad/{name}/alignment"] = align
        if self.cfg.aggregate == "block":
            row = L.aggregate_blocks(row)
        row.update(self._moment_metrics())  # per parameter, never aggregated
        return row

    def _moment_metrics(self) -> dict[str, float]:
        """`optim/<layer>/<param>/{m,v}_{sqnr_db,underflow}` of this step's update (none when
        the update was skipped)."""
        if not self.moments:
            return {}
        recorded, self.optimizer.moment_stats = self.optimizer.moment_stats, {}
        out = {}
        for key, p in self.moments.items():
            if p not in recorded:
                continue
            for moment, sums in zip("mv", recorded[p], strict=True):
                sqnr, underflow = quantization_metrics(sums)
                out[f"optim/{key}/{moment}_sqnr_db"] = sqnr
                out[f"optim/{key}/{moment}_underflow"] = underflow
        return out

    def moment_key_count(self) -> int:
        """The `optim/` keys of one per-layer row."""
        return 4 * len(self.moments)

    # -- per-step row, state, summary ----------------------------------------------------------

    def step_metrics(self, tokens_per_s: float, tokens_per_step: int) -> dict[str, float]:
        out = dict(self.spikes.metrics())
        out["perf/step_time_s"] = tokens_per_step / tokens_per_s if tokens_per_s > 0 else math.nan
        if self.cfg.peak_flops:
            out["perf/mfu"] = perf.mfu(
                tokens_per_s, self.per_token, self.cfg.peak_flops, self.world
            )
        out.update(perf.peak_memory_gib())
        return out

    def state_dict(self) -> dict:
        return {
            "spikes": self.spikes.state_dict(),
            "guard": self.guard.state_dict() if self.guard else None,
        }

    def load_state_dict(self, d: dict | None) -> None:
        """Restore from a checkpoint, the guard's fallbacks applied to the model first (call
        before loading the checkpoint's module state)."""
        if not d:
            return
        self.spikes.load_state_dict(d["spikes"])
        if self.guard is not None and d.get("guard"):
            moved = self.guard.state.recipe  # a reload: fallbacks made since may be undone
            self.guard.load_state_dict(d["guard"])
            self.guard.apply(self.model, self.guard.state.recipe, moved)

    def reset_guard(self) -> int:
        """`precision.guard.reset`: forget the fallbacks (after the checkpoint's module state is
        loaded); returns how many layers went back to the run's recipe."""
        if self.guard is None:
            return 0
        n = len(self.guard.state.recipe)
        self.guard.reset(self.model)
        return n

    def summary_lines(self) -> list[str]:
        lines = []
        if self.guard is not None and (self.guard.cfg.enabled or self.guard.state.events):
            evs = self.guard.state.events
            lines.append(f"precision guard: {len(evs)} fallback(s)")
            lines += [
                f"  step {e['step']}: {e['layer']} {e['from']} -> {e['to']} ({e['reason']})"
                for e in evs
            ]
        if self.spikes.diverged:
            lines.append(f"divergence flagged at step {self.spikes.state.diverged_at}")
        return lines
