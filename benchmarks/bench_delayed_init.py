"""The first step of delayed scaling: TE's scale 1 (`delayed_init: one`) against current scaling
until the history has an amax (`delayed_init: current`), on the main job's model.

One forward and backward of the tiny recipe's model on the first 16 blocks of the embedded
corpus; per converted layer, the fraction of grad_output elements that underflow in E5M2 and
the cosine between its weight gradient and the FP32 model's. Prints a markdown table.

    python benchmarks/bench_delayed_init.py
"""

from __future__ import annotations

import copy
import datetime

import torch
import torch.nn.functional as F
from machine import cpu_model

import lptrain
from lptrain import recipes
from lptrain.cli import recipe_files
from lptrain.config.schema import load
from lptrain.data import dataset
from lptrain.models.decoder import build_model


def main() -> None:
    cfg = load(dict(recipe_files())["recipes/pretrain/tiny-fp8.yaml"])
    blocks = dataset.load_blocks(cfg.data, dataset.byte_tokenizer(), True, lambda: None)
    batch = torch.from_numpy(blocks[:16].astype("int64"))
    current = recipes.from_dict(
        {"base": "fp8-delayed"}
        | {g: {op: {"delayed_init": "current"} for op in ops} for g, ops in recipes.GEMMS.items()}
    )
    one = recipes.from_dict(
        {"base": "fp8-delayed"}
        | {g: {op: {"delayed_init": "one"} for op in ops} for g, ops in recipes.GEMMS.items()}
    )
    torch.manual_seed(0)
    ref = build_model(cfg.model, 257, cfg.data.block_size)
    ref(batch).backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    print(f"machine: {cpu_model()}; {datetime.date.today()}; torch {torch.__version__}\n")
    print("| delayed_init | grad_output underflow (mean / max) | weight-grad cosine (min / mean) |")
    print("| --- | --- | --- |")
    for name, recipe in (("one (TE)", one), ("current", current)):
        m = copy.deepcopy(ref)
        m.zero_grad()
        lptrain.convert(m, recipe, skip=["lm_head"])
        lptrain.nn.collect_stats(m, 1)
        m(batch).backward()
        cos = [
            F.cosine_similarity(p.grad.flatten(), want[n].flatten(), 0).item()
            for n, p in m.named_parameters()
            if "layers" in n and p.dim() == 2
        ]
        uf = [s["grad_input.grad_output"]["underflow"] for s in lptrain.nn.layer_stats(m).values()]
        print(
            f"| {name} | {sum(uf) / len(uf):.1%} / {max(uf):.1%} | "
            f"{min(cos):.3f} / {sum(cos) / len(cos):.3f} |"
        )


if __name__ == "__main__":
    main()
