"""Rank-0 metrics: `metrics.jsonl` always, Weights & Biases optionally, and console progress.

DeepSpeed's own monitor is deliberately unused: it logs only the learning rate, against global
samples as the W&B step (dropping ours), and raises inside `initialize` when W&B has no key.
W&B problems here are reported once and never stop training.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any

from lptrain.checkpoint import rundir
from lptrain.config.schema import LoggingConfig, WandbConfig
from lptrain.observe.layers import block_of


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in h or h == os.environ.get("WANDB_BASE_URL", "") for h in hosts)


def resolve_wandb_mode(cfg: WandbConfig) -> tuple[str, str | None]:
    """(mode, note): `auto` goes online with credentials, otherwise offline, said once."""
    if cfg.mode != "auto":
        return cfg.mode, None
    if _has_wandb_credentials():
        return "online", None
    return "offline", "wandb: no credentials found, logging offline (upload later: wandb sync)"


ALERTS = ("guard", "divergence", "reload")  # event kinds that raise a W&B alert (online)
# The W&B events table: what an event records, one column each; the rest goes to `detail`.
EVENT_COLUMNS = ("step", "kind", "layer", "gemm", "operand", "from", "to", "reason", "detail")
# Alert titles are distinct per kind and step (see `Monitor.events`), so W&B's wait between
# alerts of one title (default 1 minute) only stops a repeat of the same step after a reload.
# Not 0: wandb reads 0 as "use the default".
ALERT_WAIT_S = 1
# define_metric: the loss curves also against tokens (runs with different batch sizes or
# block sizes compare), and summaries that hold the best or worst value, not only the last.
TOKEN_AXIS = ("loss", "val_loss")
SUMMARIES = {
    "loss": "min,last",
    "val_loss": "min,last",
    "grad_norm": "max,last",
    "stability/spike_score": "max,last",
    "perf/peak_mem_gib": "max",
    "perf/peak_rss_gib": "max",
}


def panel_key(key: str) -> str:
    """The W&B name of a metric. W&B opens one panel section per first `/` segment, so every
    `quant/<layer>/...` chart would share one `quant` section (560 for the tiny nvfp4 model).
    In W&B the block joins the section name: `quant/layers.3.attn.wq/output.input/amax` becomes
    `quant.layers.3/attn.wq/output.input/amax` (a section per block). A layer outside a numbered
    block, and every other metric, keeps its name; the run directory's files keep the names.
    Per-block keys (`monitor.aggregate: block`) open the same sections:
    `quant/layers.3/output.input/amax` as `quant.layers.3/output.input/amax`. Shadow recipes'
    keys (`shadow/<recipe>/<layer>/...`) get a section per recipe and block:
    `shadow.mxfp8.layers.3/attn.wq/output.input/underflow`."""
    kind, _, rest = key.partition("/")
    if kind == "shadow":
        recipe, _, rest = rest.partition("/")
        kind = f"shadow.{recipe}"
    elif kind != "quant":
        return key
    layer, _, tail = rest.partition("/")
    if not tail or not any(p.isdigit() for p in layer.split(".")):  # outside numbered blocks
        return f"{kind}/{rest}"
    block = block_of(layer)
    inside = layer[len(block) + 1 :]  # empty for a per-block key (monitor.aggregate: block)
    return f"{kind}.{block}/{inside + '/' if inside else ''}{tail}"


def event_row(ev: dict) -> list:
    """One row of the events table: the columns the event has, the other fields as text."""
    detail = ", ".join(f"{k} {v}" for k, v in ev.items() if k not in EVENT_COLUMNS)
    return [ev.get(c) for c in EVENT_COLUMNS[:-1]] + [detail or None]


def alert_text(evs: list[dict]) -> str:
    """The alert for one kind at one step: a line per event (a layer per guard fallback)."""
    return "\n".join(
        ", ".join(f"{k} {v}" for k, v in ev.items() if k not in ("kind", "step")) for ev in evs
    )


def _finite_or_none(row: dict) -> dict:
    # JSON has no NaN/Inf; W&B and the report read null as "no value".
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def _fmt(value: float | None, spec: str) -> str:
    return "nan" if value is None else format(value, spec)  # non-finite values arrive as None


class _Wandb:
    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, say, run_id=None):
        self.run = None
        # One training run is one W&B run: every segment resumes `run_id` (run.json). W&B
        # keeps a run's steps increasing: a step it already holds (online it says where the
        # resumed run stands; after a non-finite reload we know what we sent) is not sent again.
        self.floor, self.sent = 0, 0
        self.table = None  # the events table (INCREMENTAL: each log sends only the new rows)
        mode, note = resolve_wandb_mode(cfg)
        if note:
            say(note)
        if mode == "disabled":
            return
        try:
            self.run = self._init(cfg, mode, run_dir, config, run_id)
        except Exception as exc:  # noqa: BLE001 - W&B must never kill the job
            if mode == "online":
                say(f"wandb: online init failed ({type(exc).__name__}: {exc}); retrying offline")
                try:
                    self.run = self._init(cfg, "offline", run_dir, config, run_id)
                except Exception as exc2:  # noqa: BLE001
                    say(f"wandb: disabled ({type(exc2).__name__}: {exc2})")
            else:
                say(f"wandb: disabled ({type(exc).__name__}: {exc})")
        if self.run is None:
            return
        if getattr(self.run, "resumed", False):
            self.floor = int(getattr(self.run, "step", 0) or 0)
        self._define_metrics()

    @staticmethod
    def _init(cfg: WandbConfig, mode: str, run_dir: Path, config: dict, run_id: str | None):
        import wandb  # optional dependency (the train extra)

        settings = wandb.Settings(init_timeout=30, console="off", silent=True, x_disable_stats=True)
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or config.get("run", {}).get("name"),
            group=cfg.group,
            job_type=cfg.job_type,
            tags=cfg.tags or None,
            config=config,
            dir=str(run_dir),
            mode=mode,
            settings=settings,
            reinit="finish_previous",
            id=run_id,
            resume="allow" if run_id else None,
        )

    def _define_metrics(self) -> None:
        try:
            self.run.define_metric("tokens", summary="max")
            for name in TOKEN_AXIS:
                self.run.define_metric(name, step_metric="tokens", summary=SUMMARIES[name])
            for name, summary in SUMMARIES.items():
                if name not in TOKEN_AXIS:
                    self.run.define_metric(name, summary=summary)
        except Exception:  # noqa: BLE001 - chart settings must never stop training
            pass

    def log_events(self, step: int, rows: list[list], counts: dict[str, int]) -> None:
        """The new rows of the events table and the running counts, at `step`."""
        if self.run is None:
            return
        try:
            if self.table is None:
                import wandb  # optional dependency (the train extra)

                self.table = wandb.Table(
                    columns=list(EVENT_COLUMNS), log_mode="INCREMENTAL", allow_mixed_types=True
                )
            for row in rows:
                self.table.add_data(*row)
        except Exception:  # noqa: BLE001
            self.run = None
            return
        self.log({"step": step, **counts, "events/table": self.table})

    def log(self, row: dict) -> None:
        if self.run is None:
            return
        if row["step"] < self.floor or row["step"] < self.sent:
            return
        self.sent = row["step"]
        try:
            self.run.log({panel_key(k): v for k, v in row.items() if k != "step"}, step=row["step"])
        except Exception:  # noqa: BLE001
            self.run = None

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (e-mail/Slack per the user's W&B settings); online runs only."""
        if self.run is None or getattr(self.run, "offline", True):
            return
        try:
            import wandb  # optional dependency (the train extra)

            self.run.alert(
                title=title, text=text, level=wandb.AlertLevel.WARN, wait_duration=ALERT_WAIT_S
            )
        except Exception:  # noqa: BLE001 - an alert must never stop training
            pass

    def summarize(self, values: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update(values)
        except Exception:  # noqa: BLE001
            pass

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:  # noqa: BLE001
                pass


class Monitor:
    """Call `log(row)` with step metrics; only rank 0 writes anything."""

    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: Path,
        config: dict,
        total_steps: int,
        rank: int,
        wandb_id: str | None = None,
    ):
        """wandb_id: the W&B run this training run logs to (run.json), resumed if it exists."""
        self.enabled = rank == 0
        self.run_dir = run_dir
        self.total = total_steps
        self.bar = None
        self.wandb = None
        if not self.enabled:
            return
        self.run_dir = run_dir
        self._files: dict = {}  # layers.jsonl, events.jsonl: opened on first use
        self.event_counts: dict[str, int] = {}
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.wandb = _Wandb(cfg.wandb, run_dir, config, self.say, wandb_id)
        use_bar = cfg.progress == "bar" or (cfg.progress == "auto" and sys.stderr.isatty())
        if use_bar:
            from tqdm import tqdm  # optional dependency (the train extra)

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        self.t0 = time.monotonic()

    def say(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def start_at(self, step: int) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def rewind(self, step: int) -> None:
        """Training went back to `step` (a non-finite reload): later rows are superseded."""
        if not self.enabled:
            return
        self.file.close()
        rundir.rewind_metrics(self.run_dir, step)
        self.file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        if "loss" in row:  # a training row carries the running event counts (whole run)
            row.update({f"events/{k}": n for k, n in sorted(self.event_counts.items())})
        self.file.write(json.dumps(row) + "\n")
        self.wandb.log(row)
        if "loss" in row:
            self._progress(row)
        else:
            self.say(
                f"step {row['step']}: "
                + ", ".join(
                    f"{k} {v:.4f}" for k, v in row.items() if k != "step" and isinstance(v, float)
                )
            )

    # -- monitoring (observe/): per-layer rows and events ----------------------------

    def _jsonl(self, name: str):
        if name not in self._files:
            self._files[name] = open(self.run_dir / name, "a", buffering=1)
        return self._files[name]

    def log_layers(self, row: dict[str, Any]) -> None:
        """A per-layer row: `layers.jsonl` (keeps metrics.jsonl small) and W&B, same step."""
        if not self.enabled:
            return
        row = _finite_or_none(row)
        self._jsonl("layers.jsonl").write(json.dumps(row) + "\n")
        self.wandb.log(row)

    def event(self, ev: dict[str, Any]) -> None:
        self.events([ev])

    def events(self, evs: list[dict[str, Any]]) -> None:
        """Spikes, divergences, guard fallbacks, skipped steps, reloads or resumes of one step:
        a line each in `events.jsonl` and on the console; in W&B a row each in the `events/table`
        table, a running count per kind (`events/<kind>`) and, online, one alert per kind
        listing all of its events (every layer that fell back at this step)."""
        if not self.enabled or not evs:
            return
        evs = [_finite_or_none(ev) for ev in evs]
        by_kind: dict[str, list[dict]] = {}
        for ev in evs:
            self._jsonl("events.jsonl").write(json.dumps(ev) + "\n")
            kind = ev["kind"]
            self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
            by_kind.setdefault(kind, []).append(ev)
            self.say(f"event at step {ev['step']}: {kind}: {alert_text([ev])}")
        step = evs[0]["step"]
        counts = {f"events/{k}": self.event_counts[k] for k in by_kind}
        self.wandb.log_events(step, [event_row(ev) for ev in evs], counts)
        for kind, group in by_kind.items():
            if kind in ALERTS:
                n = len(group)
                layers = f", {n} layer{'s' * (n > 1)}" if kind == "guard" else ""
                self.wandb.alert(f"lptrain: {kind} at step {step}{layers}", alert_text(group))

    def event_counts_state(self) -> dict[str, int]:
        """The running count per event kind, saved in checkpoints (rank 0's is the one used)."""
        return dict(self.event_counts) if self.enabled else {}

    def restore_event_counts(self, counts: dict[str, int]) -> None:
        """A resume continues the counts of the checkpoint it resumes from."""
        if self.enabled:
            self.event_counts = dict(counts)

    def _progress(self, row: dict) -> None:
        loss, norm = (_fmt(row[k], ".4f") for k in ("loss", "grad_norm"))
        if self.bar is not None:
            self.bar.n = row["step"]
            self.bar.set_postfix_str(f"loss {loss} tok/s {row['tokens_per_s']:.0f}")
            return
        elapsed = time.monotonic() - self.t0
        self.say(
            f"step {row['step']}/{self.total} loss {loss} lr {row['lr']:.3e} "
            f"grad_norm {norm} tok/s {row['tokens_per_s']:.0f} "
            f"elapsed {elapsed:.0f}s"
        )

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        for f in self._files.values():
            f.close()
        self.wandb.summarize({f"events/{k}": n for k, n in self.event_counts.items()})
        self.wandb.finish()
