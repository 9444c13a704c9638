"""The run directory's own files, written by rank 0 once `resume.plan` has accepted the run.

- `config.yaml`, `deepspeed.json`: atomic rewrites, only after the resume checks passed (a
  refused resume leaves them as they were).
- `run.json`: the W&B run id, so that every resumed segment logs to the same W&B run; a fresh
  start gets a new id.
- `metrics.jsonl`: one row per step. On a resume from step S (and on a non-finite reload) rows
  with `step > S` are moved to `metrics-superseded.jsonl` (each tagged `superseded_at: S`), so
  readers never see a step twice and nothing logged is lost.
- `--archive`: an earlier run's checkpoints and files move to `archive/<date-time>/`.
- `lptrain.lock`: who trains in the directory now (lock.py), rewritten by every start.

`--run-dir` may name a new directory, an empty one or a run directory; a non-empty directory
of anything else is refused before anything is written (it would lose its `config.yaml`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import string
import time
from pathlib import Path

from lptrain.checkpoint import store
from lptrain.checkpoint.manifest import write_atomic
from lptrain.errors import ConfigError

METRICS = "metrics.jsonl"
SUPERSEDED = "metrics-superseded.jsonl"
RUN_JSON = "run.json"
# What an earlier run left and a fresh start must not overwrite (W&B's own local store stays).
_RUN_FILES = ("config.yaml", "deepspeed.json", METRICS, SUPERSEDED, RUN_JSON, "logs", "base")
LOCK = "lptrain.lock"  # lock.py
# Only an lptrain run directory holds one of these (not config.yaml: any tool may write one).
_MARKERS = ("checkpoints", "deepspeed.json", METRICS, RUN_JSON, LOCK, "archive")


def check_target(run_dir: Path) -> None:
    """Raise ConfigError (`--run-dir`) unless `run_dir` is new, empty or an lptrain run
    directory: training writes config.yaml, logs/ and checkpoints/ into it."""
    try:
        if not run_dir.is_dir():
            return  # new (a file in the way fails when it is created)
        names = sorted(p.name for p in run_dir.iterdir())
    except OSError as exc:
        raise ConfigError("--run-dir", f"{run_dir} cannot be read: {exc}") from None
    if not names or any(n in _MARKERS for n in names):
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise ConfigError(
        "--run-dir",
        f"{run_dir} is not empty ({shown}) and is not an lptrain run directory (no "
        f"checkpoints/, {METRICS} or {RUN_JSON}); give a new or empty directory",
    )


def _archive_dir(run_dir: Path) -> Path:
    base = run_dir / "archive" / time.strftime("%Y%m%d-%H%M%S")
    out, n = base, 1
    while out.exists():
        out, n = base.with_name(f"{base.name}-{n}"), n + 1
    return out


def archive(run_dir: Path, tags: tuple[str, ...] | None = None) -> Path:
    """Move an earlier run aside: everything (tags=None) or only `tags` (newer checkpoints
    than the one resumed from; `latest` then names the newest remaining tag and a copy of
    metrics.jsonl goes along). Returns the archive directory."""
    dest = _archive_dir(run_dir)
    ckpt = run_dir / "checkpoints"
    (dest / "checkpoints").mkdir(parents=True)
    if tags is None:
        moving = [p for p in ckpt.iterdir()] if ckpt.is_dir() else []
        moving = [p for p in moving if p.name not in ("zero_to_fp32.py", "zero_to_torch.py")]
        for p in moving:
            os.replace(p, dest / "checkpoints" / p.name)
        for name in _RUN_FILES:
            if (run_dir / name).exists():
                os.replace(run_dir / name, dest / name)
        return dest
    for tag in tags:
        os.replace(ckpt / tag, dest / "checkpoints" / tag)
    remaining = store.list_tags(ckpt)
    if remaining:
        store.write_latest(ckpt, remaining[-1])
    if (run_dir / METRICS).exists():
        shutil.copy2(run_dir / METRICS, dest / METRICS)
    return dest


def _rows(path: Path) -> list[tuple[str, dict | None]]:
    """(line, parsed row or None if the line is not JSON, e.g. cut short by a kill)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        out.append((line, row if isinstance(row, dict) else None))
    return out


def _after(row: dict, step: int) -> bool:
    s = row.get("step")
    return isinstance(s, (int, float)) and s > step


def rewind_metrics(run_dir: Path, step: int) -> None:
    """Move the rows logged after `step` (and any line cut short) to metrics-superseded.jsonl."""
    path = run_dir / METRICS
    if not path.exists():
        return
    rows = _rows(path)
    later = lambda r: r is None or _after(r, step)  # noqa: E731
    keep = [line for line, r in rows if not later(r)]
    dropped = [r if r is not None else {"unparsed": line} for line, r in rows if later(r)]
    if len(keep) == len(rows):
        return
    if dropped:  # appended before metrics.jsonl shrinks: a kill in between loses nothing
        with open(run_dir / SUPERSEDED, "a") as f:
            f.writelines(json.dumps({**r, "superseded_at": step}) + "\n" for r in dropped)
            f.flush()
            os.fsync(f.fileno())
    write_atomic(path, "".join(line + "\n" for line in keep))


def new_wandb_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def wandb_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RUN_JSON).read_text()).get("wandb_run_id")
    except (OSError, ValueError, AttributeError):
        return None


def write_run_json(run_dir: Path, wandb_run_id: str) -> None:
    write_atomic(run_dir / RUN_JSON, json.dumps({"wandb_run_id": wandb_run_id}, indent=1) + "\n")


def write_run_files(run_dir: Path, config_yaml: str, ds_config: dict) -> None:
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", config_yaml)
    write_atomic(run_dir / "deepspeed.json", json.dumps(ds_config, indent=2) + "\n")


def prepare(run_dir: Path, plan, config_yaml: str, ds_config: dict, say) -> str:
    """Rank 0, after the plan was accepted: archive, rewind metrics, write the run files.
    Returns the W&B run id (kept on a resume, new on a fresh start)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if plan.archive_all or plan.archive_newer:
        dest = archive(run_dir, plan.archive_newer if not plan.archive_all else None)
        say(f"archive: moved the earlier checkpoints and files to {dest}")
    rewind_metrics(run_dir, plan.step)
    run_id = wandb_id(run_dir) if plan.source is not None else None
    if run_id is None:  # a fresh start, or a run dir from before run.json
        run_id = new_wandb_id()
        write_run_json(run_dir, run_id)
    write_run_files(run_dir, config_yaml, ds_config)
    return run_id
