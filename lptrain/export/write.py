"""`lptrain export RUN_DIR [--out DIR] [--format int|hf|compressed-tensors]`: the deployable
model of a run.

`int` (default) writes `model.safetensors` (integer codes, steps, offsets, scales, and the
float tensors of layers that stay in float) and `lptrain_export.json` (the run's config, the
tokenizer and each quantized layer's layout); `lptrain eval DIR` and `restore.open_export`
load it. The fold (lptrain/export/fold.py) per layer kind:

* L4Q: I = round(clamp(V)) as b-bit integers + (s, b) per group, and the precision recipe's
  GEMMs and state when the run had one. The loaded forward is the training forward bit for bit
  (same values, same GEMM chunks or the same recipe GEMMs).
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
the run's tokenizer files. A precision recipe's quantized GEMMs cannot be expressed there.
`compressed-tensors` (compressed.py) writes such a directory with the quantized layers kept
quantized (codes + scales), which `transformers` loads without lptrain; the export reloads it
and records its validation loss.

An export stands alone (standalone.py): it holds its tokenizer (`tokenizer/`), and loading it
never looks at the run or its `init.from` base. Its `manifest.json` (every file's size and
SHA-256, written last) is verified by every read (validate.py). The target is checked before
any work (nothing is written over an existing path, its folder must be writable); the output
is staged in `<out>.tmp<PID>` and appears in one rename. Staging folders left by killed
exports are removed by the next export to the same target.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lptrain.checkpoint import manifest, store
from lptrain.errors import ConfigError
from lptrain.export import compressed, evaluate, restore, standalone, to_hf
from lptrain.export.folding import FORMAT, fold, layout
from lptrain.models import hf
from lptrain.nn import Linear
from lptrain.qat import QuantizedLinear

# -- writing ------------------------------------------------------------------------------


DEFAULT_OUT = {"int": "export", "hf": "export-hf", "compressed-tensors": "export-ct"}


def _target(run_path: Path, out: str | None, fmt: str) -> Path:
    run_dir, _, _ = restore.locate_checkpoint(run_path)
    target = Path(out) if out else run_dir / DEFAULT_OUT[fmt]
    check_target(target)
    return target


def check_target(target: Path) -> None:
    """Refuse, before any work, a target that exists: a directory, a file, or a symbolic link,
    dangling or not (`lexists`: `exists` follows the link and says no)."""
    if os.path.lexists(target):
        what = " (a symbolic link to nothing)" if not target.exists() else ""
        raise ConfigError("--out", f"{target} already exists{what}; choose another --out")


def write_int(model, opened, how, losses, tmp: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_model  # optional dependency (the train extra)

    layers = {n: layout(m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    # The guard's recipes of layers the export's skeleton builds (a folded layer's recipe is
    # in its layout): open_export puts them in place as open_run did.
    modules = dict(model.named_modules())
    fallbacks = {n: r for n, r in opened.fallbacks.items() if isinstance(modules.get(n), Linear)}
    hf_base = type(model).__name__ == "HFCausalLM"
    if hf_base:
        model.model.config.save_pretrained(str(tmp / "hf"))
    save_model(model, str(tmp / restore.EXPORT_WEIGHTS))
    meta = {
        "format": FORMAT,
        "source": opened.source,
        "config": opened.cfg.to_dict(),
        "tokenizer": standalone.copy_tokenizer(opened.tok.name, opened.tok, tmp),
        "hf_config": hf_base,
        "layers": layers,
        "fallbacks": fallbacks,
        "fold": how,
        "val_loss": losses,
        **(extra or {}),
    }
    (tmp / restore.EXPORT_JSON).write_text(json.dumps(meta, indent=1) + "\n")


def _write_hf(model, opened, tmp: Path, eval_loss) -> tuple[float, list[str]]:
    """to_hf.py: the plain Hugging Face model, written, reloaded and checked; (the reloaded
    model's validation loss, what the plain model drops)."""
    if type(model).__name__ != "HFCausalLM":
        raise ConfigError(
            "--format", "hf needs a base loaded from a Hugging Face directory (init.from)"
        )
    probe = eval_loss.probe()
    model, dropped = to_hf.plain_model(model)
    to_hf.save(model, opened, tmp)
    return eval_loss(to_hf.verify(model, tmp, probe)), dropped


@contextlib.contextmanager
def staging(target: Path) -> Iterator[Path]:
    """A directory beside `target` to write into, made at once (a target that cannot be
    written fails here, before the work); it gets a manifest, written last, and becomes
    `target` in one rename when the block succeeds, and is removed when it fails: an export
    appears whole or not at all."""
    remove_stale(target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError("--out", f"{target}: cannot write there ({exc.strerror})") from None
    try:
        with store.disk_errors(tmp):  # a full disk: one line, no partial export left
            yield tmp
            manifest.write(tmp, {"kind": "lptrain export"})
        check_target(target)  # nothing appeared there meanwhile (a rename would replace it)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(target: Path) -> None:
    """Remove the staging folders of earlier exports to `target` whose process is gone (a
    killed export). A live process's folder is left alone: it may still be writing."""
    if not target.parent.is_dir():
        return
    name = re.compile(re.escape(target.name) + r"\.tmp(\d+)")
    for p in target.parent.iterdir():
        m = name.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # ours from an earlier process with this PID: we write it now
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class _EvalLoss:
    """The export's validation loss: `args.blocks` blocks of the run's validation split."""

    def __init__(self, cfg, tok, max_blocks: int | None):
        self.blocks, self.rows, self.name = evaluate.val_blocks(cfg, tok)
        self.batch, self.max_blocks = cfg.deepspeed.micro_batch, max_blocks

    def __call__(self, model: nn.Module) -> float:
        return evaluate.mean_loss(model, self.blocks, self.rows, self.batch, self.max_blocks)

    def probe(self) -> torch.Tensor:
        """The first micro-batch's inputs (B, T), for comparing logits."""
        rows = self.rows[: self.batch]
        return torch.from_numpy(np.stack([self.blocks[r] for r in rows]).astype(np.int64))[:, :-1]


def main(args) -> int:
    run_path = Path(args.run_dir)
    target = _target(run_path, args.out, args.format)
    with staging(target) as tmp:  # made first: an unwritable target fails before the work
        opened = restore.open_run(run_path)
        model, cfg, tok = opened.model, opened.cfg, opened.tok
        eval_loss = _EvalLoss(cfg, tok, args.blocks)
        before = eval_loss(model)
        how = fold(model)
        after = eval_loss(model)
        losses = {"trained": before, "export": after, "data": eval_loss.name}
        if args.format == "hf":
            reloaded, dropped = _write_hf(model, opened, tmp, eval_loss)
        elif args.format == "compressed-tensors":
            ct_layers = compressed.write(model, tok, tmp)
            # What transformers computes from the written files, not the model in memory.
            losses["compressed-tensors"] = eval_loss(hf.load(tmp, key="--out"))
            compressed.write_report(tmp, ct_layers, losses)
        else:
            write_int(model, opened, how, losses, tmp)
    if not how:  # adapters, QAT and bit switching each refuse to select no layer: none ran
        print(
            "folded 0 layers: the run has no adapter, QAT or bit-switching layer (a full "
            "fine-tune or a pretraining run); the export holds its weights as trained"
        )
    for what in sorted(set(how.values())):
        print(f"folded {sum(v == what for v in how.values())} layers: {what}")
    print(f"val_loss trained {before:.4f} -> export {after:.4f} ({after - before:+.4f}) "
          f"on {eval_loss.name}")  # fmt: skip
    if args.format == "hf":
        for what in dropped:
            print(f"hf: not expressible in transformers, dropped: {what}")
        print(f"hf: reloaded by transformers: val_loss {reloaded:.4f} ({reloaded - after:+.4f} "
              "against the folded model)")  # fmt: skip
    if args.format == "compressed-tensors":
        print("\n".join(compressed.summary(ct_layers)))
        ct = losses["compressed-tensors"]
        print(f"val_loss in transformers {ct:.4f} ({ct - after:+.2e} vs the int export)")
    print(f"export: {target.resolve()}")
    return 0
