"""What a run starts from, decided before anything is built or written.

`plan` looks at the run directory and `checkpoint.resume`, picks the checkpoint (the newest
that verifies), refuses anything that would delete or overwrite an earlier run's checkpoints
unless `--archive` moves them aside, and compares the config with the one the checkpoint was
trained with, key by key, against `RULES`.

`RULES` is data: an ordered list of (key-path glob, what a change on resume means). The first
matching rule wins. A section added to TrainConfig adds its rules here (a test checks that every
config key is covered):

- FREE: may change on any resume (run length, logging, evaluation, checkpoint cadence).
- FLAG: a deliberate change, allowed only with `--allow-change KEY` (globs work); `effect`
  names what lptrain does about the saved state (see README, "Checkpoints and resume").
- NEVER: the checkpoint cannot hold it (shapes, batch layout, engine dtype); a new run is needed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import typing
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import yaml

from lptrain.checkpoint import elastic, manifest, store
from lptrain.checkpoint.store import Found
from lptrain.config.schema import TrainConfig
from lptrain.errors import ConfigError

FREE, FLAG, NEVER = "free", "flag", "never"
RESET_QUANTIZERS = "reset_quantizers"


@dataclass(frozen=True)
class Rule:
    keys: str  # fnmatch glob on the dotted key path
    change: str  # FREE | FLAG | NEVER
    why: str  # shown in errors and notes
    effect: str = ""  # FLAG only: what is done to the saved state


RULES: tuple[Rule, ...] = (
    Rule("model.checkpointing", FREE, "activation checkpointing is exact"),
    Rule("model.dropout", FLAG, "the new rate applies from the resumed step"),
    Rule("model.*", NEVER, "the checkpoint holds this model's shape and initialization"),
    Rule("precision.backend", FLAG, "backends compute the emulated values; quantizer state kept"),
    Rule(
        "precision.saved_activations",
        FLAG,
        "backward's copies of norm/SwiGLU/attention inputs change the gradients; no state kept",
    ),
    Rule("precision.guard.*", FREE, "guard settings apply from the resumed step; fallbacks kept"),
    Rule("precision.*", FLAG, "quantizer state is reset", RESET_QUANTIZERS),
    Rule("data.cache_dir", FREE, "a cache location only"),
    Rule("data.tokenizer", NEVER, "token ids are baked into the embedding"),
    Rule("data.block_size", NEVER, "the sequence length is part of the batch layout"),
    Rule("data.*", FLAG, "the data order continues at the same sample index over the new data"),
    Rule("optim.states", NEVER, "the checkpoint holds the Adam moments in this stored form"),
    Rule("optim.master", NEVER, "the checkpoint holds the weights at this precision"),
    Rule("optim.*", FLAG, "applied from the resumed step; Adam moments and the step count kept"),
    Rule("deepspeed.zero_stage", NEVER, "saved per ZeRO stage; needs a universal checkpoint"),
    Rule("deepspeed.zero_init", FREE, "how the model is built; the checkpoint holds its weights"),
    Rule("deepspeed.extra", FLAG, "merged into deepspeed.json as given"),
    Rule("deepspeed.*", NEVER, "the batch layout and engine dtype are in the saved state"),
    # Compared by content, not by path: checkpoint/base.py (the base may have moved or gone).
    Rule("init.from", FREE, "the checkpoint holds the weights; the base is checked by hash"),
    Rule("qat.*", NEVER, "the checkpoint holds the learned quantizer scales of this layout"),
    Rule("bitswitch.eval_bits", FREE, "which bit-width evaluation reports"),
    Rule("bitswitch.alrs_*", FLAG, "applied from the resumed step; learned scales kept"),
    Rule("bitswitch.distill", FLAG, "applied from the resumed step"),
    Rule("bitswitch.*", NEVER, "the checkpoint holds the scales and steps of these bit-widths"),
    Rule("adapters.dropout", FLAG, "the new rate applies from the resumed step"),
    Rule("adapters.*", NEVER, "the checkpoint holds these adapters and the stored base"),
    Rule("checkpoint.*", FREE, "checkpoint cadence"),
    Rule("logging.*", FREE, "logging only"),
    Rule("monitor.*", FREE, "monitoring only"),
    Rule("run.seed", NEVER, "the seed fixed the initialization and the data order"),
    Rule("run.*", FREE, "run length, evaluation and limits"),
)
# A key no rule covers (a section added without rules) needs the flag: safe, and a test fails.
_UNCOVERED = Rule("*", FLAG, "no resume rule covers this key yet")


def rule_for(key: str) -> Rule:
    return next((r for r in RULES if fnmatch.fnmatchcase(key, r.keys)), _UNCOVERED)


# ---------------------------------------------------------------- config differences

_ABSENT = object()


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every leaf key path of the config (a dict-valued field such as precision.recipe is one
    leaf)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.metadata.get('key', f.name)}"  # the YAML key (init.from)
        tp = hints[f.name]
        out += config_keys(tp, path + ".") if dataclasses.is_dataclass(tp) else [path]
    return out


def _get(tree, path: str):
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


@dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object

    @property
    def rule(self) -> Rule:
        return rule_for(self.key)

    def values(self) -> str:
        show = lambda v: "(absent)" if v is _ABSENT else _short(v)  # noqa: E731
        return f"{show(self.old)} -> {show(self.new)}"

    def text(self) -> str:
        return f"{self.key} {self.values()}"


def _short(v, limit: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def diff(old: dict, new: TrainConfig) -> list[Change]:
    """Keys whose value differs between the saved config (a raw mapping) and `new`."""
    now, defaults = new.to_dict(), TrainConfig().to_dict()
    out = []
    for key in config_keys():
        if key == "init.from":  # compared by content, not path: checkpoint/base.py
            continue
        a, b = _get(old, key), _get(now, key)
        # A key added since the checkpoint was saved: the run ran as its default says.
        added = a is _ABSENT and b == _get(defaults, key)
        if a != b and not added and not _same_tokenizer(key, a, b, old):
            out.append(Change(key, a, b))
    return out


def _same_tokenizer(key: str, old, new, saved: dict) -> bool:
    """Before data.tokenizer could be unset, a fine-tune's config recorded the default `byte`,
    which then meant what unset means now: the base's tokenizer (config/inherit.py)."""
    return (
        key == "data.tokenizer" and old == "byte" and new is None
        and _get(saved, "init.from") not in (None, _ABSENT)
    )  # fmt: skip


def check_allow(patterns: list[str]) -> None:
    keys = config_keys()
    for p in patterns:
        if not any(fnmatch.fnmatchcase(k, p) for k in keys):
            raise ConfigError("--allow-change", f"{p!r} matches no config key (see config.yaml)")


def check_changes(changes: list[Change], allow: list[str], tag: str) -> None:
    """Raise ConfigError (one line naming the key) for a change the rules do not permit."""
    allowed = lambda k: any(fnmatch.fnmatchcase(k, p) for p in allow)  # noqa: E731
    never = [c for c in changes if c.rule.change == NEVER]
    flagged = [c for c in changes if c.rule.change == FLAG and not allowed(c.key)]
    bad = never or flagged
    if not bad:
        return
    c, more = bad[0], [x.key for x in bad[1:]]
    also = f" (also changed: {', '.join(more)})" if more else ""
    if never:
        how = f"a resume cannot change it ({c.rule.why}); start a new run (another --run-dir)"
    else:
        how = (
            f"to change it on resume add --allow-change {c.key} ({c.rule.why}), or start a new "
            "run (another --run-dir)"
        )
    raise ConfigError(c.key, f"changed since checkpoint {tag} ({c.values()}); {how}{also}")


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    source: Found | None  # the checkpoint to load; None: a fresh start
    changes: tuple[Change, ...] = ()
    archive_all: bool = False  # move the earlier run's state to RUN/archive/<time>/ first
    archive_newer: tuple[str, ...] = ()  # tags newer than `source` that --archive moves
    notes: tuple[str, ...] = ()  # one line each, said before training
    saved: dict | None = dataclasses.field(default=None, repr=False)  # the source's config
    universal: bool = False  # saved on another world size: load a universal checkpoint

    @property
    def step(self) -> int:
        return self.source.step if self.source is not None else 0

    @property
    def reset_quantizers(self) -> bool:
        return any(c.rule.effect == RESET_QUANTIZERS for c in self.changes)

    def saved_section(self, section: str) -> dict | None:
        """The saved config's `section` mapping if any of its keys changed, else None."""
        if self.saved is None or not any(c.key.startswith(section + ".") for c in self.changes):
            return None
        return self.saved.get(section)


def _span(tags: list[str]) -> str:
    if len(tags) <= 1:
        return tags[0] if tags else "a 'latest' file"
    return f"{len(tags)} checkpoints, {tags[0]}..{tags[-1]}"


def _archive_hint(run_dir: Path, what: str = "them") -> str:
    where = run_dir / "archive" / "<date-time>"
    return f"add --archive (moves {what} to {where}/), or use another --run-dir"


def plan(cfg: TrainConfig, run_dir: Path, world: int, allow: list[str], archive: bool) -> Plan:
    """Collective (verification is shared out over ranks); raises ConfigError, same on all."""
    check_allow(allow)
    own = run_dir / "checkpoints"
    resume = cfg.checkpoint.resume
    earlier = store.list_tags(own)
    if resume == "none":
        if store.has_checkpoints(own) and not archive:
            raise ConfigError(
                "checkpoint.resume",
                f"none, but {own} holds an earlier run's checkpoints ({_span(earlier)}"
                f"); to start fresh here {_archive_hint(run_dir)}",
            )
        return Plan(None, archive_all=store.has_checkpoints(own))
    if resume == "auto":
        found, rejected = store.newest_verified(own)
        if found is None:
            if store.has_checkpoints(own) and not archive:
                raise ConfigError(
                    "checkpoint.resume",
                    f"no checkpoint in {own} verifies ({store.reasons(rejected)}); "
                    f"to start fresh here {_archive_hint(run_dir)}",
                )
            return Plan(None, archive_all=store.has_checkpoints(own))
        try:
            return _resume(cfg, found, rejected, world, allow, own, Plan(found))
        except ConfigError as exc:
            older = _older_that_resumes(cfg, found, world, allow)
            if older is None:
                raise
            raise ConfigError(exc.path, exc.problem + _go_back(found, older, run_dir)) from None
    found, rejected = store.pick(Path(resume), "checkpoint.resume")
    base = Plan(found)
    if found.ckpt_dir.resolve() == own.resolve():
        newer = tuple(t for t in earlier if store.step_of(t) > found.step)
        if newer and not archive:
            raise ConfigError(
                "checkpoint.resume",
                f"{found.tag} is older than {newer[-1]} in this run directory and continuing "
                f"from it would overwrite the newer checkpoints; to go back to it "
                f"{_archive_hint(run_dir, 'the newer ones')}",
            )
        base = Plan(found, archive_newer=newer)
    elif store.has_checkpoints(own):
        if not archive:
            raise ConfigError(
                "checkpoint.resume",
                f"{own} already holds this run's own checkpoints ({_span(earlier)})"
                f"; to continue them set checkpoint.resume=auto; to start again from {resume} "
                f"here {_archive_hint(run_dir)}",
            )
        base = Plan(found, archive_all=True)
    return _resume(cfg, found, rejected, world, allow, own, base)


def _older_that_resumes(cfg, newest: Found, world: int, allow: list[str]) -> Found | None:
    """Collective: the newest checkpoint older than `newest` in its directory that this config
    resumes and that verifies (another run's checkpoint may be the newest in a directory).
    Configs are compared first, so only a checkpoint that would be accepted is hashed."""
    ckpt_dir = newest.ckpt_dir
    tags = manifest.from_rank0(store.list_tags(ckpt_dir) if _rank0() else None)
    for tag in reversed([t for t in tags if store.step_of(t) < newest.step]):
        meta, _ = manifest.from_rank0(manifest.read(ckpt_dir / tag) if _rank0() else None)
        if meta is None:
            continue
        try:  # the same checks as the resume itself, on the unverified manifest
            _resume(cfg, Found(ckpt_dir, tag, meta), [], world, allow, ckpt_dir, Plan(None))
        except ConfigError:
            continue
        found, _ = store.verify(ckpt_dir, tag)
        if found is not None:
            return found
    return None


def _go_back(newest: Found, older: Found, run_dir: Path) -> str:
    """How to resume from `older` instead; plan() takes an older tag of the run directory with
    --archive, which moves the newer checkpoints aside."""
    return (
        f"; {newest.tag} is the newest checkpoint in {newest.ckpt_dir}; {older.tag} there "
        f"verifies and resumes with this config: to go back to it add --set checkpoint.resume="
        f"{older.path} --archive (moves the newer checkpoints to {run_dir / 'archive'}/"
        "<date-time>/)"
    )


def _resume(
    cfg, found: Found, rejected, world: int, allow: list[str], own: Path, base: Plan
) -> Plan:
    """The plan for resuming `found`; `own`: this run's checkpoint directory."""
    elastic_note = None
    if found.manifest.get("world_size", world) != world:
        # or ConfigError (ZeRO stage 0, compact optimizer states)
        elastic_note = elastic.check(found, world, own, cfg.optim.states)
    text = manifest.from_rank0(store.saved_config(found) if _rank0() else None)
    if text is None:
        raise ConfigError(
            "checkpoint.resume",
            f"{found.path} has no {store.CONFIG} to compare this config with; copy the "
            "config it was trained with there (python -m lptrain.checkpoint.manifest does for old "
            "checkpoints)",
        )
    saved = yaml.safe_load(text) or {}
    changes = diff(saved, cfg)
    if elastic_note is not None:  # the layout is re-made for the new world size anyway
        layout = [c for c in changes if c.key in elastic.LAYOUT_KEYS]
        changes = [c for c in changes if c.key not in elastic.LAYOUT_KEYS]
    check_changes(changes, allow, found.tag)
    notes = [elastic_note] if elastic_note is not None else []
    if elastic_note is not None and layout:
        notes.append("config: batch layout changed: " + ", ".join(c.text() for c in layout))
    if rejected:
        notes.append(f"checkpoint: resuming from {found.tag}, the newest that verifies "
                     f"({store.reasons(rejected)})")  # fmt: skip
    if changes:
        said = ", ".join(c.text() + (f" ({c.rule.why})" if c.rule.change == FLAG else "")
                         for c in changes)  # fmt: skip
        notes.append(f"config: changed since {found.tag}: {said}")
    return dataclasses.replace(
        base, changes=tuple(changes), notes=tuple(notes), saved=saved,
        universal=elastic_note is not None,
    )  # fmt: skip


def _rank0() -> bool:

    return not dist.is_initialized() or dist.get_rank() == 0
