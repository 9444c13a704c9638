"""Training data: corpus -> tokens -> fixed blocks -> a deterministic, rank-sharded,
resumable batch order (dataset.py); `file:line` diagnosis of a bad corpus file (datacheck.py).
The embedded corpora themselves are `lptrain.corpora`.
"""

from lptrain.data.dataset import (
    BatchSource,
    Layout,
    Tokenizer,
    load_blocks,
    load_tokenizer,
    mean_loss,
    split,
    val_batches,
)

__all__ = [
    "BatchSource",
    "Layout",
    "Tokenizer",
    "load_blocks",
    "load_tokenizer",
    "mean_loss",
    "split",
    "val_batches",
]
