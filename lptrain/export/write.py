"""`lptrain export RUN_DIR [--out DIR] [--format int|hf]`: the deployable model of a run.

`int` (default) writes `model.safetensors` (integer codes, steps, offsets, scales, and the
float tensors of layers that stay in float) and `lptrain_export.json` (the run's config, the
tokenizer and each quantized layer's layout); `lptrain eval DIR` and `restore.open_export`
load it. The fold (lptrain/export/fold.py) per layer kind:

* L4Q: I = round(clamp(V)) as b-bit integers + (s, b) per group. The loaded forward is the
  training forward bit for bit (same values, same GEMM chunks).
* LSQ / LSQ+ (full QAT): integer codes + step (+ offset), the input quantizer and the base's
  precision-recipe GEMMs kept: bit for bit the training model's (eval) forward.
* Bit switching (double rounding): the int8 store, I_h and the per-channel scale plus each
  bit-width's input step and the layer's Hessian trace (`switch` in the layout); it evaluates
  at the highest bit-width, and `lptrain switch` derives any other bit-width from it alone.
* LoRA: folded into the base. A float base (`none`) gets W + (α/r)BA exactly up to float
  rounding; a quantized base is dequantized, added to and re-quantized into its own format
  (round to nearest): the export reports what that costs in validation loss.

`hf` (only for a base loaded from a Hugging Face directory) writes a directory that
`transformers` loads: every linear weight set to its deployable values (dequantized), plus
the base's tokenizer files. A precision recipe's quantized GEMMs cannot be expressed there.
Nothing is written over an existing directory; the output appears atomically (tmp + rename).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

import lptrain.nn as lpnn
from lptrain.config.inherit import tokenizer_spec
from lptrain.config.init_source import locate
from lptrain.errors import ConfigError
from lptrain.export import evaluate, restore
from lptrain.export.folding import FORMAT, fold, layout
from lptrain.models.hf import TOKENIZER_FILES
from lptrain.nn.select import set_module
from lptrain.qat import QuantizedLinear

# -- writing ------------------------------------------------------------------------------


def _target(run_path: Path, out: str | None, fmt: str) -> Path:
    run_dir, _, _ = restore.locate_checkpoint(run_path)
    target = Path(out) if out else run_dir / ("export" if fmt == "int" else "export-hf")
    if target.exists():
        raise ConfigError("--out", f"{target} already exists; choose another --out")
    return target


def write_int(model, opened, how, losses, tmp: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_model  # optional dependency (the train extra)

    layers = {n: layout(m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    hf_base = type(model).__name__ == "HFCausalLM"
    if hf_base:
        model.model.config.save_pretrained(str(tmp / "hf"))
    save_model(model, str(tmp / restore.EXPORT_WEIGHTS))
    meta = {
        "format": FORMAT,
        "source": opened.source,
        "config": opened.cfg.to_dict(),
        "tokenizer": tokenizer_spec(opened.cfg),
        "hf_config": hf_base,
        "layers": layers,
        "fold": how,
        "val_loss": losses,
        **(extra or {}),
    }
    (tmp / restore.EXPORT_JSON).write_text(json.dumps(meta, indent=1) + "\n")


@torch.no_grad()
def _write_hf(model, opened, tmp: Path) -> None:
    if type(model).__name__ != "HFCausalLM":
        raise ConfigError(
            "--format", "hf needs a base loaded from a Hugging Face directory (init.from)"
        )
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.copy_(m.dequantize())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
            set_module(model, name, lin)
    lpnn.unconvert(model)
    model.model.save_pretrained(str(tmp))
    base = locate(opened.cfg.init.from_).path
    for f in TOKENIZER_FILES:
        if (base / f).is_file():
            shutil.copy2(base / f, tmp / f)


@contextlib.contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A directory beside `target` to write into; it becomes `target` in one rename when the
    block succeeds and is removed when it fails: an export appears whole or not at all."""
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(args) -> int:
    run_path = Path(args.run_dir)
    target = _target(run_path, args.out, args.format)
    opened = restore.open_run(run_path)
    model, cfg, tok = opened.model, opened.cfg, opened.tok
    blocks, rows, name = evaluate.val_blocks(cfg, tok)
    before = evaluate.mean_loss(model, blocks, rows, cfg.deepspeed.micro_batch, args.blocks)
    how = fold(model)
    after = evaluate.mean_loss(model, blocks, rows, cfg.deepspeed.micro_batch, args.blocks)
    losses = {"trained": before, "export": after, "data": name}
    with staging(target) as tmp:
        if args.format == "hf":
            _write_hf(model, opened, tmp)
        else:
            write_int(model, opened, how, losses, tmp)
    for what in sorted(set(how.values())):
        print(f"folded {sum(v == what for v in how.values())} layers: {what}")
    print(f"val_loss trained {before:.4f} -> export {after:.4f} ({after - before:+.4f}) on {name}")
    print(f"export: {target.resolve()}")
    return 0
