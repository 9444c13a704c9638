"""`lptrain export RUN_DIR [--out DIR] [--format int|hf]`: the deployable model of a run.

`int` (default) writes `model.safetensors` (integer codes, steps, offsets, scales, and the
float tensors of layers that stay in float) and `lptrain_export.json` (the run's config, the
tokenizer and each quantized layer's layout); `lptrain eval DIR` and `restore.open_export`
load it. Per layer kind:

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
from lptrain.lora import L4QLinear, LoRALinear, QuantizedLinear
from lptrain.qat import LSQQuantizer, QATLinear
from lptrain.qat.bitswitch import BitSwitchLinear, SwitchInfo
from lptrain.train import evaluate, restore
from lptrain.train.config import ConfigError

FORMAT = 1


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, module)


# -- folding ------------------------------------------------------------------------------


@torch.no_grad()
def _fold_lora(m: LoRALinear) -> tuple[nn.Module, str]:
    if m.base_format == "none":
        m.merge()
        return m.base_layer, "merged into the float base weight"
    base = m.base_layer
    new = QuantizedLinear.from_weight(
        base.dequantize() + m.delta_weight().float(), base.fmt, bias=base.bias,
        group_size=base.group_size,
    )  # fmt: skip
    new.recipe_layer = base.recipe_layer
    return new, f"merged into the dequantized weight and re-quantized to {base.fmt}"


def fold(model: nn.Module) -> dict[str, str]:
    """Replace every trained layer by its deployable form, in place; {layer: how}."""
    how = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, L4QLinear):
            new, what = m.export(), f"l4q: {m.bits}-bit codes + step/offset per {m.group_size}"
        elif isinstance(m, QATLinear):
            new, what = m.export(), "lsq: integer codes + step/offset"
        elif isinstance(m, BitSwitchLinear):
            new = m.to_store()
            what = (
                f"double rounding: int{m.bits[0]} codes + scale per row, "
                f"switchable to {list(m.bits)}"
            )
        elif isinstance(m, LoRALinear):
            new, what = _fold_lora(m)
        else:
            continue
        set_module(model, name, new.eval())
        how[name] = what
    return how


# -- layouts (what the JSON records, and the empty modules it rebuilds) -------------------


def layout(q: QuantizedLinear) -> dict:
    iq = q.input_quantizer
    return {
        "fmt": q.fmt,
        "in_features": q.in_features,
        "out_features": q.out_features,
        "gemm": q.gemm,
        "bits": q.bits,
        "group_size": q.group_size,
        "n": q.n,
        "packed": q.fmt in ("int4", "int8", "affine") and q.codes.dtype == torch.uint8,
        "offset": getattr(q, "offset", None) is not None,
        "bias": q.bias is not None,
        "recipe": q.recipe_layer.recipe.to_dict() if q.recipe_layer is not None else None,
        "recipe_bias": q.recipe_layer is not None and q.recipe_layer.bias is not None,
        "input_quantizer": None
        if iq is None
        else {"bits": iq.bits, "signed": iq.signed, "offset": iq.offset is not None},
        "bytes_per_param": round(q.bytes_per_param(), 6),
        "switch": q.switch.layout() if getattr(q, "switch", None) is not None else None,
    }


def shell(lay: dict) -> QuantizedLinear:
    """An empty QuantizedLinear with the buffers `lay` describes (load_state_dict fills it)."""
    i, o, fmt = lay["in_features"], lay["out_features"], lay["fmt"]
    q = QuantizedLinear(i, o, fmt, gemm=lay["gemm"])
    u8, f32 = torch.uint8, torch.float32
    if fmt == "bf16":
        q.register_buffer("weight_bf16", torch.zeros(o, i, dtype=torch.bfloat16))
    elif fmt == "fp8":
        q.register_buffer("codes", torch.zeros(o, i, dtype=u8))
        q.register_buffer("scale", torch.zeros(o, 1, dtype=f32))
    elif fmt == "nvfp4":
        q.register_buffer("codes", torch.zeros(o, i // 2, dtype=u8))
        q.register_buffer("block_scale", torch.zeros(o, i // 16, dtype=u8))
        q.register_buffer("global_scale", torch.zeros((), dtype=f32))
    else:
        g = lay["group_size"]
        codes = torch.zeros(o, i, dtype=torch.int16)
        off = torch.zeros(o, i // g) if lay["offset"] else None
        q.set_affine(codes, torch.zeros(o, i // g), off, bits=lay["bits"], group_size=g, n=lay["n"])
        q.fmt = fmt
    if lay["bias"]:
        q.register_buffer("bias", torch.zeros(o))
    if lay["recipe"] is not None:
        layer = lpnn.Linear(i, o, lay["recipe_bias"], recipe=lay["recipe"])
        layer.register_parameter("weight", None)
        q.recipe_layer = layer.requires_grad_(False)
    if lay["input_quantizer"] is not None:
        iq = lay["input_quantizer"]
        q.input_quantizer = LSQQuantizer(
            iq["bits"], signed=iq["signed"], offset=iq["offset"], role="input"
        ).requires_grad_(False)
    if lay.get("switch"):  # absent in exports written before bit switching
        q.switch = SwitchInfo.from_layout(lay["switch"])
    return q


# -- writing ------------------------------------------------------------------------------


def _target(run_path: Path, out: str | None, fmt: str) -> Path:
    run_dir, _, _ = restore.locate_checkpoint(run_path)
    target = Path(out) if out else run_dir / ("export" if fmt == "int" else "export-hf")
    if target.exists():
        raise ConfigError("--out", f"{target} already exists; choose another --out")
    return target


def write_int(model, opened, how, losses, tmp: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_model

    from lptrain.train import init_from

    layers = {n: layout(m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    hf_base = type(model).__name__ == "HFCausalLM"
    if hf_base:
        model.model.config.save_pretrained(str(tmp / "hf"))
    save_model(model, str(tmp / restore.EXPORT_WEIGHTS))
    meta = {
        "format": FORMAT,
        "source": opened.source,
        "config": opened.cfg.to_dict(),
        "tokenizer": init_from.tokenizer_spec(opened.cfg),
        "hf_config": hf_base,
        "layers": layers,
        "fold": how,
        "val_loss": losses,
        **(extra or {}),
    }
    (tmp / restore.EXPORT_JSON).write_text(json.dumps(meta, indent=1) + "\n")


@torch.no_grad()
def _write_hf(model, opened, tmp: Path) -> None:
    from lptrain.train import init_from

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
    base = init_from.locate(opened.cfg.init.from_).path
    from lptrain.train.hf import TOKENIZER_FILES

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
