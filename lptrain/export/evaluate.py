"""`lptrain eval PATH [--data D] [--blocks N]`: validation loss and perplexity of a run
directory, a checkpoint or an export.

By default the data is the run's own validation split (its `data` section: the same fixed
split `lptrain train` holds out); `--data` evaluates the validation split of another corpus
(a path, or `embedded:stdlib` / `embedded:pydoc-topics`) with the run's tokenizer and block
size. Loss is the mean next-token cross-entropy over the blocks (nats), perplexity its exp.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch
from torch import nn

from lptrain.config.schema import DataConfig, TrainConfig, check_data_path
from lptrain.data import dataset
from lptrain.errors import ConfigError
from lptrain.export import restore


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    blocks: int
    tokens: int
    data: str


def val_blocks(cfg: TrainConfig, tok: dataset.Tokenizer, data_path: str | None = None):
    """(blocks, validation rows, corpus name) of the run's data, or of `data_path` (--data)."""
    if data_path is None:
        return _val_blocks(cfg.data, tok)
    check_data_path(data_path, "--data")
    try:
        return _val_blocks(dataclasses.replace(cfg.data, path=data_path), tok)
    except ConfigError as exc:  # the corpus is --data's, not the run's data.path
        if exc.path != "data.path":
            raise
        raise ConfigError("--data", exc.problem) from None


def _val_blocks(dcfg: DataConfig, tok: dataset.Tokenizer):
    blocks = dataset.load_blocks(dcfg, tok, True, lambda: None)
    split = dataset.split(len(blocks), dcfg.val_fraction)
    return blocks, split.val, dcfg.path or "embedded:stdlib"


@torch.no_grad()
def mean_loss(model: nn.Module, blocks, rows, batch: int, max_blocks: int | None = None) -> float:
    """The mean loss over the first `max_blocks` of `rows` (all by default), each block once,
    in batches of `batch`: the training log's val_loss on one rank (dataset.mean_loss)."""
    rows = rows[:max_blocks] if max_blocks else rows
    model.eval()
    return dataset.mean_loss(
        model, dataset.val_batches(blocks, rows, dataset.Layout(batch, 1, 1, 0))
    )


def evaluate(model, cfg, tok, data_path=None, max_blocks=None) -> EvalResult:
    blocks, rows, name = val_blocks(cfg, tok, data_path)
    n = min(len(rows), max_blocks) if max_blocks else len(rows)
    loss = mean_loss(model, blocks, rows, cfg.deepspeed.micro_batch, max_blocks)
    return EvalResult(loss, math.exp(min(loss, 700.0)), n, n * cfg.data.block_size, name)


def main(args) -> int:

    opened = restore.open_any(args.path)
    r = evaluate(opened.model, opened.cfg, opened.tok, args.data, args.blocks)
    print(
        f"{opened.source}: val_loss {r.loss:.4f}  perplexity {r.perplexity:.3f}  "
        f"({r.blocks} blocks, {r.tokens} tokens of {r.data})"
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(r) | {"source": opened.source}))
    return 0
