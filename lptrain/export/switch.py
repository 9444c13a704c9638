"""`lptrain switch PATH (--bits B | --budget AVG) [--out DIR] [--blocks N]`: a bit-switching
run deployed at another precision from its stored int8 weights alone (algorithms.md §7).

PATH is an export of a bit-switching run (`lptrain export`: the int8 codes I_h, the
per-channel scales and each bit-width's input step, no float weights) or the run itself (its
latest checkpoint is folded into that int8 store in memory first; nothing is read from the
float weights afterwards). Every switched layer is `switch_store(store, b)`: the second
rounding of the stored integers, bit for bit the training model's forward at b.

`--bits B` puts every layer at B. `--budget AVG` chooses each layer's bit-width so that the
switched layers store at most AVG bits per weight and the estimated loss increase
Σ_l HMT_l·‖Ŵ_l,b − Ŵ_l,h‖² is minimal (budget.py: an exact dynamic program; HMT_l is the
layer's average Hessian trace measured by HASB, or 1 for every layer of a run without HASB),
and prints the per-layer table. The budget counts stored bits, not nominal ones: 8 × the
bytes the export writes for each switched layer at b bits (its packed codes, its per-row step
and its input step: `QuantizedLinear.stored_bytes` of the very layer written), so scales count
and a budget of 4 does not fit every layer at 4 bits. Both commands print what the switched
layers store. The output is an export like `lptrain export`'s (`lptrain
eval` reads it), written atomically and checked first as `lptrain export --out` is (write.py);
nothing is written over an existing path. A switched export records `switch` and has no int8
store left: switch again from the original export or the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lptrain.errors import ConfigError
from lptrain.export import evaluate, restore, write
from lptrain.export.folding import fold
from lptrain.nn.select import set_module
from lptrain.qat import QuantizedLinear
from lptrain.qat.bitswitch import budget as bud
from lptrain.qat.bitswitch import switch_store

UNIT = "stored bits per weight (packed codes + steps + input steps)"


def open_stores(path: Path) -> tuple[restore.Opened, dict[str, QuantizedLinear]]:
    """The model with every bit-switching layer as its int8 store, and {name: store}."""
    if restore.is_export(path):
        opened = restore.open_export(path)  # verified: its JSON is read below as it is
    else:
        opened = restore.open_run(path)
        fold(opened.model)
    stores = {
        name: m
        for name, m in opened.model.named_modules()
        if isinstance(m, QuantizedLinear) and getattr(m, "switch", None) is not None
    }
    if not stores and restore.is_export(path) and "switch" in _meta(path):
        raise ConfigError(
            "PATH",
            f"{path} is an export already switched to {_switched_to(_meta(path)['switch'])}: "
            "it keeps no int8 store; switch from the original export or the run",
        )
    if not stores:
        raise ConfigError(
            "PATH", f"{path} has no bit-switching layers (train with a bitswitch.bits recipe)"
        )
    return opened, stores


def _meta(export: Path) -> dict:
    return json.loads((export / restore.EXPORT_JSON).read_text())


def _switched_to(record: dict) -> str:
    if "bits" in record:
        return f"{record['bits']} bits"
    return f"a budget of {record.get('budget')} bits (average {record.get('average_bits')})"


def candidates(stores: dict[str, QuantizedLinear]) -> list[int]:
    sets = {tuple(m.switch.candidates) for m in stores.values()}
    if len(sets) != 1:
        raise ConfigError("PATH", f"layers disagree on the candidate bit-widths: {sorted(sets)}")
    return list(sets.pop())


def layer_costs(stores: dict[str, QuantizedLinear], bits: list[int]) -> tuple[list, list, bool]:
    """cost[l][k] = HMT_l · ‖Ŵ_l,bits[k] − Ŵ_l,h‖² from the stores alone; stored[l][k], the
    bits layer l's export holds at bits[k]; whether the traces were measured (HASB) or every
    layer weighs 1."""
    hmt = [float(m.switch.hmt) for m in stores.values()]
    measured = all(math.isfinite(h) for h in hmt)
    costs, stored = [], []
    for m, h in zip(stores.values(), hmt, strict=True):
        layers = [switch_store(m, b) for b in bits]  # what the export would write at each b
        top = layers[0].dequantize().double()
        errs = [float((q.dequantize().double() - top).square().sum()) for q in layers]
        costs.append([max(h, 0.0) * e if measured else e for e in errs])
        stored.append([8 * q.stored_bytes() for q in layers])
    return costs, stored, measured


def assign(stores, bits: list[int], args) -> tuple[dict[str, int], str, dict]:
    """{layer: bits}, the label of the output and what the export records."""
    if args.bits is not None:
        if args.bits not in bits:
            raise ConfigError("--bits", f"{args.bits} is not a candidate bit-width {bits}")
        return dict.fromkeys(stores, args.bits), f"b{args.bits}", {"bits": args.bits}
    costs, stored, measured = layer_costs(stores, bits)
    sizes = [m.in_features * m.out_features for m in stores.values()]
    low, high = (sum(row[k] for row in stored) / sum(sizes) for k in (-1, 0))
    if not low <= args.budget <= high:
        span = f"[{low:.4f}, {high:.4f}] stored bits per weight"
        raise ConfigError("--budget", f"must be in {span} ({bits[-1]} to {bits[0]} bits with "
                          f"their scales), got {args.budget:g}")  # fmt: skip
    try:
        sol = bud.solve(costs, sizes, bits, args.budget, stored)
    except ConfigError as exc:  # the library's `budget` is this command's --budget
        raise ConfigError("--budget", exc.problem) from None
    chosen = dict(zip(stores, sol.bits, strict=True))
    _print_table(stores, chosen, sizes, measured, sol)
    nominal = sum(n * b for n, b in zip(sizes, sol.bits, strict=True)) / sum(sizes)
    record = {"budget": args.budget, "unit": UNIT, "average_bits": sol.average_bits,
              "nominal_bits": nominal, "layers": chosen, "cost": sol.cost,
              "hessian": measured}  # fmt: skip
    return chosen, f"avg{args.budget:g}", record


def _print_table(stores, chosen, sizes, measured: bool, sol) -> None:
    what = "average Hessian trace (HASB)" if measured else "1 (no Hessian traces: HASB was off)"
    print(f"per-layer bit-widths (weight of each layer's error: {what}):")
    width = max(len(n) for n in stores)
    print(f"  {'layer':<{width}}  {'weights':>9}  {'trace/weight':>12}  bits")
    for (name, m), n in zip(stores.items(), sizes, strict=True):
        print(f"  {name:<{width}}  {n:>9}  {float(m.switch.hmt):>12.4g}  {chosen[name]}")
    print(f"average {sol.average_bits:.4f} {UNIT}; estimated cost {sol.cost:.6g}")


def main(args) -> int:
    path = Path(args.path)
    if not path.exists():
        raise ConfigError("PATH", f"no such run directory, checkpoint or export: {path}")
    label = f"b{args.bits}" if args.bits is not None else f"avg{args.budget:g}"
    parent = path.parent if restore.is_export(path) else restore.locate_checkpoint(path)[0]
    target = Path(args.out) if args.out else parent / f"export-{label}"
    write.check_target(target)
    with write.staging(target) as tmp:  # made first: an unwritable target fails before the work
        opened, stores = open_stores(path)
        bits = candidates(stores)
        chosen, label, record = assign(stores, bits, args)
        model, cfg, tok = opened.model, opened.cfg, opened.tok
        blocks, rows, data_name = evaluate.val_blocks(cfg, tok)
        micro = cfg.deepspeed.micro_batch
        before = evaluate.mean_loss(model, blocks, rows, micro, args.blocks)
        how = {}
        for name, store in stores.items():
            set_module(model, name, switch_store(store, chosen[name]).eval())
            how[name] = f"switched to {chosen[name]} bits from the int{bits[0]} store"
        after = evaluate.mean_loss(model, blocks, rows, micro, args.blocks)
        stored = _stored(model, stores)
        losses = {"stored": before, "export": after, "data": data_name}
        extra = {"switch": record}
        if restore.is_export(path):  # the run's config as recorded, not the one loading made
            extra["config"] = _meta(path)["config"]
        write.write_int(model, opened, how, losses, tmp, extra=extra)
    print(
        f"val_loss int{bits[0]} {before:.4f} -> {label} {after:.4f} ({after - before:+.4f}) "
        f"on {data_name}"
    )
    print(f"switched layers: {stored[0]} bytes stored, {stored[1]:.4f} {UNIT}")
    print(f"export: {target.resolve()}")
    return 0


def _stored(model, stores) -> tuple[int, float]:
    """(bytes, bits per weight) the switched layers of `model` store, as the export writes
    them."""
    layers = [model.get_submodule(name) for name in stores]
    total = sum(m.stored_bytes() for m in layers)
    return total, 8 * total / sum(m.in_features * m.out_features for m in layers)


@torch.no_grad()
def switched_model(path: str | Path, bits: int | dict[str, int]):
    """The model of PATH (run or export) with every bit-switching layer at `bits` (one for
    all, or {layer: bits}); for benchmarks and tests."""
    opened, stores = open_stores(Path(path))
    for name, store in stores.items():
        b = bits[name] if isinstance(bits, dict) else bits
        set_module(opened.model, name, switch_store(store, b).eval())
    return opened
