"""`lptrain` command line: `train`, `report`, `recipes` (and room for `eval`, `export`).

Flags avoid prefixes of torchrun options (`--max…`, `--log…`, `--run…`, `--node…`, `--monitor…`,
`--master…`): torchrun rejects a script flag as ambiguous when it abbreviates one of its own.
`--run-dir` is safe because torchrun's `--run-path`/`--run_path` is not a prefix of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

from lptrain.train.config import ConfigError

EPILOG = """examples:
  lptrain train recipes/pretrain/tiny-fp8.yaml
  lptrain train recipes/pretrain/tiny-fp32.yaml --set run.max_steps=50 --set optim.lr=3e-3
  lptrain train recipes/pretrain/tiny-bf16.yaml --run-dir runs/mine   # re-run resumes it
  torchrun --nproc_per_node 2 -m lptrain train recipes/pretrain/tiny-fp32.yaml --run-dir runs/dp2
  lptrain report runs/fp32 runs/nvfp4 --out report/   # plots + HTML from run directories

recipe sections: model, precision, data, optim, deepspeed, checkpoint, logging, monitor, run;
every key and its default is in the README ("Recipe files") and in any run's config.yaml.

exit status: 0 done (or stopped by SIGTERM/SIGINT after saving), 1 training failed,
2 bad recipe or flags (one line: error: <key.path>: <problem>)."""


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
        "Writes config.yaml, deepspeed.json, metrics.jsonl and checkpoints/ into "
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
    # The deepspeed launcher passes --local_rank=N right after the module name, i.e. before
    # `train`; accept it in both places. LOCAL_RANK in the environment wins.
    tr.add_argument(
        "--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
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
    from lptrain import recipes

    print("precision recipes (precision.recipe):")
    for name in recipes.names():
        print(f"  {name}")
    return 0


def cmd_report(args) -> int:
    from lptrain.report import RunError, build

    try:
        page = build(args.runs, args.out)
    except RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {page.resolve()}")
    return 0


def _default_run_dir(name: str) -> str:
    return str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _agree(value: str) -> str:
    """Rank 0's value on every rank (the default run dir carries a timestamp)."""
    import torch.distributed as dist

    box = [value]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _prepare(args):
    """Everything that can fail on user input, before any heavy work."""
    from lptrain.train import config, converters, data, engine, model, monitoring

    cfg = config.load(args.recipe, args.overrides)
    tok = data.load_tokenizer(cfg.data.tokenizer)
    model.model_args(cfg.model, vocab_size=tok.vocab_size, max_seq_len=cfg.data.block_size)
    info = engine.dist_env(args.local_rank)
    engine.check_batch(cfg, info)
    ds_config = engine.deepspeed_config(cfg, info.world)
    convs = converters.build(cfg)
    monitoring.check(cfg)
    return cfg, info, ds_config, convs, tok


def _write_run_files(run_dir: Path, cfg, ds_config: dict) -> None:
    from lptrain.train.config import to_yaml

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")


def cmd_train(args) -> int:
    cfg, info, ds_config, convs, tok = _prepare(args)
    from lptrain.train import engine, trainer
    from lptrain.train.monitor import Monitor

    engine.init_distributed(info)
    run_dir = Path(_agree(args.run_dir or _default_run_dir(cfg.run.name)))
    if info.rank == 0:
        _write_run_files(run_dir, cfg, ds_config)

    def say(msg: str) -> None:
        if info.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    s = trainer.setup(cfg, ds_config, convs, tok, info, run_dir, say)
    monitor = Monitor(cfg.logging, run_dir, trainer.describe_config(cfg), s.total_steps, info.rank)
    try:
        p = trainer.run(s, monitor, monitor.say)
    finally:
        monitor.close()
    if info.rank == 0:
        print(f"done: {p.step} steps, {p.tokens} tokens, {p.skipped} skipped")
        print(f"run directory: {run_dir.resolve()}")
    return 0


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
    try:
        return cmd_train(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from lptrain.train.trainer import NonFiniteError

        if isinstance(exc, NonFiniteError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
