"""`lptrain` command line: `train`, `export`, `eval`, `switch`, `report`, `plan`, `recipes`.

Flags avoid prefixes of torchrun options (`--max…`, `--log…`, `--run…`, `--node…`, `--monitor…`,
`--master…`): torchrun rejects a script flag as ambiguous when it abbreviates one of its own.
`--run-dir` is safe because torchrun's `--run-path`/`--run_path` is not a prefix of it.

Longer than our usual file on purpose: the whole argparse tree and one short handler per
subcommand read in one place; the work behind each handler lives in its own module.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fnmatch
import os
import signal
import sys
import time
from importlib import resources
from pathlib import Path

import torch
import torch.distributed as dist

from lptrain import observe, recipes
from lptrain.checkpoint import base as bases
from lptrain.checkpoint import lock, resume, rundir, store
from lptrain.config import schema
from lptrain.config.inherit import tokenizer_spec
from lptrain.config.init_source import locate
from lptrain.config.schema import TrainConfig, _key, to_yaml
from lptrain.data import dataset
from lptrain.distributed import engine, memory
from lptrain.errors import ConfigError
from lptrain.export import evaluate, switch, write
from lptrain.liblog import LibraryLog
from lptrain.models import converters, decoder, hf
from lptrain.observe.metrics import Monitor
from lptrain.report import RunError, build
from lptrain.trainer import loop
from lptrain.trainer.loop import NonFiniteError
from lptrain.trainer.stop import Interrupted, Signals

EPILOG = """examples:
  lptrain train recipes/pretrain/tiny-fp8.yaml
  lptrain train recipes/pretrain/tiny-fp32.yaml --set run.max_steps=50 --set optim.lr=3e-3
  lptrain train recipes/pretrain/tiny-bf16.yaml --run-dir runs/mine   # re-run resumes it
  lptrain train runs/mine/schema.yaml --run-dir runs/mine \\
      --set precision.recipe=nvfp4 --allow-change precision.recipe     # switch recipe mid-run
  torchrun --nproc_per_node 2 -m lptrain train recipes/pretrain/tiny-fp32.yaml --run-dir runs/dp2
  lptrain report runs/fp32 runs/nvfp4 --out report/   # plots + HTML from run directories
  lptrain plan recipes/pretrain/gpu-7b-fp8.yaml --nodes 4 --gpus-per-node 8 --gpu-memory 80

recipe sections: {sections};
every key, its type and default is in docs/config.md (the config reference) and in any run's
schema.yaml.

exit status: 0 done (or stopped by SIGTERM/SIGINT after saving, or during start-up with
nothing to save), 1 training failed, 2 bad recipe, flags or data, or a resume that would lose
or mix work (one line: error: <key.path>: <problem>), 128+N a second signal N stopped the run
without saving (the last checkpoint is intact).""".format(
    sections=", ".join(_key(f) for f in dataclasses.fields(TrainConfig))
)


class _Parser(argparse.ArgumentParser):
    """Flag errors as one line, `error: <problem>`, exit 2: the same shape as recipe errors."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="lptrain",
        description="Low-precision (FP8/FP4/INT16) training for PyTorch on DeepSpeed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    tr = sub.add_parser(
        "train",
        help="train a model from a recipe file",
        description="Pretrain a language model from a YAML recipe with DeepSpeed. "
        "Writes schema.yaml, deepspeed.json, metrics.jsonl and checkpoints/ into "
        "the run directory and prints its path at the end.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("recipe", metavar="RECIPE.yaml", help="recipe file (see recipes/pretrain/)")
    tr.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, value parsed as YAML (repeatable), "
        "e.g. --set run.max_steps=20 --set precision.skip=[lm_head,'*.w2']",
    )
    tr.add_argument(
        "--run-dir",
        metavar="DIR",
        help="run directory (default: "
        "runs/<recipe name>-<date-time>); an existing one with checkpoints resumes",
    )
    tr.add_argument(
        "--archive",
        action="store_true",
        help="move an earlier run's checkpoints and files in the run directory to "
        "RUN/archive/<date-time>/ where they would otherwise be overwritten (a fresh start, "
        "or a resume from an older checkpoint); without it such a start is refused",
    )
    tr.add_argument(
        "--allow-change",
        dest="allow_change",
        action="append",
        default=[],
        metavar="KEY",
        help="on resume, accept a deliberate config change of KEY (a glob such as 'optim.*'), "
        "e.g. precision.recipe (quantizer state is reset); repeatable. Keys that a resume "
        "cannot change are refused anyway",
    )
    # The deepspeed launcher passes --local_rank=N right after the module name, i.e. before
    # `train`; accept it in both places. LOCAL_RANK in the environment wins.
    tr.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    ex = sub.add_parser(
        "export",
        help="write the deployable quantized model of a run",
        description="Fold adapters and quantizers of a run's latest checkpoint into the "
        "deployable model: integer codes, scales and offsets in safetensors plus a layout "
        "JSON (--format int), or a transformers directory for a Hugging Face base (--format "
        "hf: dequantized weights; --format compressed-tensors: the quantized layers stay "
        "quantized, loadable without lptrain). Prints the validation loss before and after "
        "folding.",
    )
    ex.add_argument("run_dir", metavar="RUN_DIR", help="run directory or one checkpoint")
    ex.add_argument("--out", metavar="DIR",
                    help="output directory (default RUN_DIR/export[-hf|-ct])")  # fmt: skip
    ex.add_argument("--format", choices=("int", "hf", "compressed-tensors"), default="int")
    ex.add_argument("--blocks", type=int, default=None, metavar="N",
                    help="validation blocks for the before/after loss (default: all)")  # fmt: skip
    ev = sub.add_parser(
        "eval",
        help="validation loss and perplexity of a run, a checkpoint or an export",
        description="Validation loss and perplexity on the run's own validation split, or "
        "on the validation split of --data (a path or embedded:stdlib / embedded:pydoc-topics).",
    )
    ev.add_argument("path", metavar="PATH", help="run directory, checkpoint or export directory")
    ev.add_argument("--data", metavar="PATH", default=None, help="another corpus to evaluate on")
    ev.add_argument("--blocks", type=int, default=None, metavar="N", help="at most N blocks")
    ev.add_argument("--json", action="store_true", help="also print one JSON line")
    rp = sub.add_parser(
        "report",
        help="plots and an HTML page from run directories (offline)",
        description="Read run directories (metrics.jsonl, layers.jsonl, events.jsonl, "
        "config.yaml; no W&B needed) and write PNG plots and one self-contained HTML page: "
        "loss against tokens for all runs, the gap to the first run, per-layer SQNR and "
        "saturation heatmaps, scale traces, spike and guard events, and a summary table.",
    )
    rp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories; the first "
                    "is the reference for the loss gap")  # fmt: skip
    rp.add_argument("--out", metavar="DIR", default="report", help="output directory "
                    "(default: ./report)")  # fmt: skip
    pl = sub.add_parser(
        "plan",
        help="per-GPU memory of a recipe on N nodes x G GPUs (nothing allocated)",
        description="Parameters, gradients, optimizer state (DeepSpeed's accounting, checked "
        "against its estimators), quantizer state, low-precision weight copies and activations "
        "per GPU for the recipe's model, ZeRO stage and precision, and whether they fit "
        "--gpu-memory. The model is built on the meta device.",
    )
    pl.add_argument("recipe", metavar="RECIPE.yaml", help="recipe file")
    pl.add_argument("--nodes", type=int, default=1, metavar="N")
    pl.add_argument("--gpus-per-node", type=int, default=8, metavar="G")
    pl.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                    help="memory of one GPU in GiB (e.g. 80)")  # fmt: skip
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, as for train")  # fmt: skip
    sw = sub.add_parser(
        "switch",
        help="deploy a bit-switching run at another precision (no retraining)",
        description="Write an export of a bit-switching run (recipes/qat/) at --bits B for "
        "every layer, or at per-layer bit-widths under an average --budget (printed as a "
        "table), derived from the stored int8 weights alone. PATH is the run or its export. "
        "Prints the validation loss at the stored and the new precision.",
    )
    sw.add_argument("path", metavar="PATH", help="bit-switching run directory or its export")
    how = sw.add_mutually_exclusive_group(required=True)
    how.add_argument("--bits", type=int, metavar="B", help="one bit-width for every layer")
    how.add_argument("--budget", type=float, metavar="AVG",
                     help="average bits per weight; per-layer bits solved exactly")  # fmt: skip
    sw.add_argument("--out", metavar="DIR", help="output directory (default: export-b<B> or "
                    "export-avg<AVG> beside the run's export)")  # fmt: skip
    sw.add_argument("--blocks", type=int, default=None, metavar="N",
                    help="validation blocks for the before/after loss (default: all)")  # fmt: skip
    sub.add_parser(
        "recipes",
        help="list shipped recipe files and named precision recipes",
        description="List the recipe files under recipes/ and the named precision "
        "recipes accepted by precision.recipe.",
    )
    return ap


def recipe_files() -> list[tuple[str, Path]]:
    """(name, path) of the shipped recipe files: `recipes/` of a checkout, installed as the
    package data `lptrain.recipe_files`, so this works from a wheel too."""
    root = resources.files("lptrain.recipe_files")
    with resources.as_file(root) as base:
        return sorted(
            (f"recipes/{p.relative_to(base).as_posix()}", p) for p in Path(base).rglob("*.yaml")
        )


def cmd_recipes() -> int:
    print("recipe files:")
    for name, _ in recipe_files():
        print(f"  {name}")

    print("precision recipes (precision.recipe):")
    for name in recipes.names():
        print(f"  {name}")
    return 0


def cmd_report(args) -> int:
    try:
        import matplotlib  # noqa: F401  optional dependency (the train extra): is it there?
    except ImportError:
        print(
            "error: lptrain report needs matplotlib: pip install 'lptrain[train]'", file=sys.stderr
        )
        return 2

    try:
        page = build(args.runs, args.out)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((page.parent / "report.txt").read_text(), end="")  # the summary, in progress marked
    print(f"report: {page.resolve()}")
    return 0


def _default_run_dir(name: str) -> str:
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _agree(value):
    """Rank 0's value on every rank (the default run dir carries a timestamp); a barrier."""
    box = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _prepare(args):
    """Everything that can fail on user input, before any heavy work. Without `init.from`
    that includes the tokenizer and the converters (`early`); a base is resolved once the run
    knows whether it starts fresh or resumes (`_with_base`)."""
    cfg = schema.load(args.recipe, args.overrides)
    early = None
    if cfg.init.from_ is None:
        early = _inputs(cfg, None)
    elif not _resumable(args.run_dir):
        locate(cfg.init.from_)  # a fresh start needs its base: say so before anything starts
    info = engine.dist_env(args.local_rank)
    engine.check_batch(cfg, info)
    ds_config = engine.deepspeed_config(cfg, info.world)
    observe.check(cfg)
    return cfg, info, ds_config, early


def _resumable(run_dir: str | None) -> bool:
    return run_dir is not None and store.has_checkpoints(Path(run_dir) / "checkpoints")


def _inputs(cfg: TrainConfig, base):
    """(tokenizer, converters) of a run whose base, if any, is `base`."""
    source = base.source if base is not None else None
    tok = dataset.load_tokenizer(tokenizer_spec(cfg, source))  # a fine-tune's base may set it
    decoder.model_args(cfg.model, vocab_size=tok.vocab_size, max_seq_len=cfg.data.block_size)
    if source is not None and source.kind == "hf":
        hf.check_positions(source.path, cfg.data.block_size)
    return tok, converters.build(cfg, base=source)


def _with_base(cfg: TrainConfig, plan, allow: list[str], say):
    """The run's base (checkpoint/base.py): resolved and hashed on a fresh start, the recorded
    one on a resume; then what depends on it: the tokenizer and the converters. `init.from`
    becomes the base's absolute path (what config.yaml keeps)."""
    if plan.source is None:
        base = bases.resolve(cfg.init.from_)
    else:
        allowed = any(fnmatch.fnmatchcase("init.from", p) for p in allow)
        base = bases.for_resume(cfg.init.from_, plan.source, allowed)
    if base is not None:
        for note in base.notes:
            say(note)
        init = dataclasses.replace(cfg.init, from_=base.record["path"])
        cfg = dataclasses.replace(cfg, init=init)
    return cfg, base, *_inputs(cfg, base)


def _ending(p, total: int, signals) -> str:
    """The first summary line: done, or stopped early (and why) with what a resume needs."""
    counts = f"{p.tokens} tokens, {p.skipped} skipped"
    if p.step >= total:
        return f"done: {p.step} steps, {counts}"
    why = (
        f"on {signal.Signals(signals.first[0]).name}"
        if signals.requested
        else "at run.stop_at_step"
    )
    return (
        f"stopped {why} at step {p.step} of {total}, {counts}; resumable: the same command "
        "continues from its checkpoint"
    )


def cmd_train(args, signals, log) -> int:
    cfg, info, ds_config, early = _prepare(args)
    engine.init_distributed(info)
    run_dir = Path(_agree(args.run_dir or _default_run_dir(cfg.run.name)))

    def say(msg: str) -> None:
        if info.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    # One writer per run directory, decided before any heavy work: a second start, a foreign
    # or an unwritable directory fail here in one line. Rank 0 holds it until this returns or
    # the process ends; a start that fails before writing anything takes its lock file away.
    held = lock.take(run_dir, say)
    started = False
    try:
        # Decide what the run starts from, and build everything, before the run directory is
        # touched (beyond its lock file): a refused resume or bad data leaves it as it was.
        plan = resume.plan(cfg, run_dir, info.world, args.allow_change, args.archive)
        for note in plan.notes:
            say(note)
        if early is None:
            cfg, base, tok, convs = _with_base(cfg, plan, args.allow_change, say)
        else:
            base, (tok, convs) = None, early
        if plan.universal:  # DeepSpeed reads this when the engine is built
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}),
                                                     "load_universal": True}}  # fmt: skip
        s = loop.setup(cfg, ds_config, convs, tok, info, run_dir, say)
        with signals.deferred():
            prepared = None
            if info.rank == 0:
                prepared = rundir.prepare(run_dir, plan, to_yaml(cfg), ds_config, say)
                if base is not None:  # what readers need of the base, carried by checkpoints
                    bases.write_copy(run_dir / bases.DIR, base)
            started = True
            wandb_id = _agree(prepared)
        log.attach(run_dir / "logs" / f"rank{info.rank}.log")
        monitor = Monitor(
            cfg.logging, run_dir, loop.describe_config(cfg), s.total_steps, info.rank,
            wandb_id=wandb_id,
        )  # fmt: skip
        try:
            p = loop.run(s, monitor, monitor.say, plan, signals)
        finally:
            monitor.close()
    finally:
        if held is not None:
            held.release(abandon=not started)
    if info.rank == 0:
        print(_ending(p, s.total_steps, signals), file=log.stdout)
        print(f"run directory: {run_dir.resolve()}", file=log.stdout, flush=True)
    return 0


def cmd_offline(args) -> int:
    """`export`, `eval`, `switch` and `plan`: one process, no DeepSpeed engine (lptrain/export/
    write.py, evaluate.py, switch.py; lptrain/distributed/memory.py)."""
    if not torch.cuda.is_available():  # unpickling a checkpoint may import deepspeed
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.command == "plan":
        return memory.main(args)
    if args.command == "export":
        return write.main(args)
    if args.command == "switch":
        return switch.main(args)

    return evaluate.main(args)


# What the file system says about where lptrain writes or reads: the user's to fix, so one
# line; any other OSError is a failure of lptrain's and keeps its traceback.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST}  # fmt: skip


def _is_disk_error(exc: OSError) -> bool:
    return exc.errno in _DISK_ERRORS and (exc.filename is not None or exc.errno in
                                          (errno.ENOSPC, errno.EDQUOT, errno.EROFS))  # fmt: skip


def os_error(exc: OSError) -> str:
    """`PATH: No space left on device [Errno 28]`: what a full disk, a read-only file system
    or a missing permission says, in one line."""
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return f"{where}{exc.strerror or exc} [Errno {exc.errno}]"


def _interrupted(exc) -> int:
    name = signal.Signals(exc.signum).name
    if exc.when == "during start-up":
        print(
            f"stopped: {name} during start-up, before any training step; nothing to save "
            "(the same command starts again)",
            file=sys.stderr,
        )
        return 0
    print(
        f"stopped: a second {name}; exiting without saving (the last complete checkpoint "
        "is intact; the same command resumes from it)",
        file=sys.stderr,
    )
    return 128 + exc.signum


def train(args) -> int:
    """`lptrain train`: signals are caught from here on, library output goes to the log."""
    signals = Signals()  # first: a signal during start-up ends with a message
    try:
        with LibraryLog().active() as log:
            return cmd_train(args, signals, log)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        return _interrupted(exc)
    except OSError as exc:
        if not _is_disk_error(exc):  # not the file system saying no: a real failure
            raise
        print(f"error: {os_error(exc)} (earlier checkpoints are intact)", file=sys.stderr)
        return 2
    except Exception as exc:
        if isinstance(exc, NonFiniteError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    finally:
        signals.close()


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    if args.command == "recipes":
        return cmd_recipes()
    if args.command == "report":
        return cmd_report(args)
    if args.command in ("export", "eval", "switch", "plan"):
        try:
            return cmd_offline(args)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            if not _is_disk_error(exc):
                raise
            print(f"error: {os_error(exc)}", file=sys.stderr)
            return 2
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
