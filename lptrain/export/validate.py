"""Every read of an export verifies it first; a problem is one line naming the file and what is
wrong (`ConfigError("PATH", ...)`: the CLI prints `error: PATH: ...` and exits 2).

In order, before anything is built: the folder is not a writer's staging folder
(`<out>.tmp<PID>`); `manifest.json`, written last, lists every file with its size and SHA-256
(`lptrain.checkpoint.manifest`) and each one matches (a missing, truncated or altered file is
named); `lptrain_export.json` parses and every layer's layout names known formats, GEMMs and
roundings with consistent sizes. After the tensors load: every trained step is finite and
nonzero, every fp8 / nvfp4 scale finite and positive, every nf4 scale absmax finite and
>= 0 (and its offset finite), and every integer code lies in the range
of its bit-width. `lptrain eval`, `lptrain
switch` and `restore.open_export` all go through `open_export`, so none of them reads a
corrupted export. An export without a manifest (lptrain before exports were verified) is
refused with the command that writes a verified one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from lptrain.checkpoint import manifest
from lptrain.errors import ConfigError, first_line
from lptrain.export import folding
from lptrain.qat.bitswitch import ROUNDINGS
from lptrain.qat.quantized import FORMATS, QuantizedLinear

EXPORT_JSON = "lptrain_export.json"
EXPORT_WEIGHTS = "model.safetensors"
MANIFEST = manifest.NAME
GEMMS = ("chunked", "full")
NO_MANIFEST = (
    f"no {MANIFEST}: an unfinished export, or one written before lptrain verified exports; "
    "export the run again (lptrain export RUN --out DIR)"
)
# `write.staging` writes into `<out>.tmp<PID>` and renames it to `<out>` when complete.
STAGING_NAME = re.compile(r".+\.tmp\d+")


def _bad(d: Path, problem: str) -> ConfigError:
    return ConfigError("PATH", f"{d}: {problem}")


# -- before anything is built --------------------------------------------------------------


def verified_meta(d: Path) -> dict:
    """The export's JSON, once its files match the manifest and its layouts check."""
    if STAGING_NAME.fullmatch(d.name):
        raise _bad(d, "the staging folder of an unfinished (killed) export; export again")
    if not (d / MANIFEST).is_file():
        raise _bad(d, NO_MANIFEST)
    _, why = manifest.problem(d)
    if why is not None:
        raise _bad(d, why)
    meta = _read_json(d / EXPORT_JSON)
    check_meta(meta, d)
    return meta


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _bad(path, f"unreadable ({first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise _bad(path, "not a JSON object")
    return meta


def check_meta(meta: dict, d: Path) -> None:
    """The record's keys and every layer's layout (no tensors needed)."""
    path = d / EXPORT_JSON
    fmt = meta.get("format")
    if fmt not in folding.READS:
        known = " and ".join(map(str, folding.READS))
        raise _bad(path, f"format {fmt!r}: this lptrain reads formats {known}; export "
                   "the run again with this lptrain")  # fmt: skip
    for key, kind in (("config", dict), ("tokenizer", str), ("layers", dict), ("hf_config", bool)):
        if not isinstance(meta.get(key), kind):
            raise _bad(path, f"{key}: missing or not a {kind.__name__}")
    fallbacks = meta.get("fallbacks", {})  # optional: exports before the guard's record
    if not isinstance(fallbacks, dict) or not all(isinstance(r, dict) for r in fallbacks.values()):
        raise _bad(path, "fallbacks: not a mapping of layer names to recipes")
    tok = meta["tokenizer"]
    if tok != "byte" and (Path(tok).is_absolute() or ".." in Path(tok).parts):
        raise _bad(path, f"tokenizer: {tok!r} is not a path inside the export")
    if tok != "byte" and not (d / tok).exists():
        raise _bad(path, f"tokenizer: {tok} is not in the export")
    if meta["hf_config"] and not (d / "hf" / "config.json").is_file():
        raise _bad(path, "hf_config: the export has no hf/config.json")
    for name, lay in meta["layers"].items():
        problem = layout_problem(lay)
        if problem is not None:
            raise _bad(path, f"layers.{name}.{problem}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def layout_problem(lay) -> str | None:
    """What is wrong with one layer's layout ('field: problem'), or None."""
    if not isinstance(lay, dict):
        return "layout: not a JSON object"
    if lay.get("fmt") not in FORMATS:
        return f"fmt: unknown format {lay.get('fmt')!r} (known: {', '.join(FORMATS)})"
    if lay.get("gemm") not in GEMMS:
        return f"gemm: unknown GEMM {lay.get('gemm')!r} (known: {', '.join(GEMMS)})"
    for key in ("in_features", "out_features"):
        if not (_is_int(lay.get(key)) and lay[key] > 0):
            return f"{key}: must be a positive integer, got {lay.get(key)!r}"
    for key in ("offset", "bias", "recipe_bias"):
        if not isinstance(lay.get(key), bool):
            return f"{key}: must be true or false, got {lay.get(key)!r}"
    if lay.get("recipe") is not None and not isinstance(lay["recipe"], dict):
        return f"recipe: must be an inline recipe (a mapping) or null, got {lay['recipe']!r}"
    return _grid_problem(lay) or _input_problem(lay.get("input_quantizer")) or _switch_problem(lay)


def _grid_problem(lay: dict) -> str | None:
    """Bits, group and lowest code of the integer formats; the block size of nvfp4."""
    if lay["fmt"] == "nvfp4" and lay["in_features"] % 16:
        return f"in_features: nvfp4 needs a multiple of 16, got {lay['in_features']}"
    if lay["fmt"] == "nf4":
        group, i = lay.get("group_size"), lay["in_features"]
        if not (_is_int(group) and group > 0 and i % group == 0 and i % 2 == 0):
            return f"group_size: nf4 needs an even in_features {i} that it divides, got {group!r}"
        return None
    if lay["fmt"] not in ("int8", "int4", "affine"):
        return None
    bits, group, n = lay.get("bits"), lay.get("group_size"), lay.get("n")
    if not (_is_int(bits) and 1 <= bits <= 8):  # codes are stored in int8 or packed
        return f"bits: must be an integer in 1..8, got {bits!r}"
    width = lay.get("code_bits")
    if width is not None and not (_is_int(width) and bits <= width <= 8):
        return f"code_bits: must be an integer in {bits}..8 (bits..8), got {width!r}"
    if width is None and not isinstance(lay.get("packed"), bool):
        return f"packed: must be true or false, got {lay.get('packed')!r}"
    if not (_is_int(group) and group > 0 and lay["in_features"] % group == 0):
        return f"group_size: must divide in_features {lay['in_features']}, got {group!r}"
    lows = (-(2 ** (bits - 1)), -(2 ** (bits - 1)) + 1, 0)  # signed, symmetric, unsigned
    if n not in lows:
        return f"n: the lowest {bits}-bit code must be one of {list(lows)}, got {n!r}"
    return None


def _input_problem(iq) -> str | None:
    if iq is None:
        return None
    if not isinstance(iq, dict):
        return f"input_quantizer: must be a mapping or null, got {iq!r}"
    if not (_is_int(iq.get("bits")) and 2 <= iq["bits"] <= 8):
        return f"input_quantizer.bits: must be an integer in 2..8, got {iq.get('bits')!r}"
    for key in ("signed", "offset"):
        if not isinstance(iq.get(key), bool):
            return f"input_quantizer.{key}: must be true or false, got {iq.get(key)!r}"
    return None


def _switch_problem(lay: dict) -> str | None:
    sw = lay.get("switch")
    if sw is None:
        return None
    if not isinstance(sw, dict):
        return f"switch: must be a mapping or null, got {sw!r}"
    if sw.get("rounding") not in ROUNDINGS:
        known = ", ".join(ROUNDINGS)
        return f"switch.rounding: unknown rounding {sw.get('rounding')!r} (known: {known})"
    bits = sw.get("bits")
    ok = isinstance(bits, list) and bits and all(_is_int(b) and 2 <= b <= 8 for b in bits)
    if not ok or bits != sorted(set(bits), reverse=True):
        return f"switch.bits: must be distinct integers in 2..8, highest first, got {bits!r}"
    if lay["fmt"] != "affine" or lay.get("bits") != bits[0]:
        got = f"{lay['fmt']} at {lay.get('bits')} bits"
        return f"switch: the store must be affine at {bits[0]} bits, got {got}"
    if sw.get("act_signed") not in (True, False, None):
        return f"switch.act_signed: must be true, false or null, got {sw.get('act_signed')!r}"
    return None


# -- building and loading ------------------------------------------------------------------


def place(model: nn.Module, name: str, lay: dict, path: Path) -> None:
    """Put the empty layer `lay` describes at `name` (a layer the model has)."""
    try:
        model.get_submodule(name)
        shell = folding.shell(lay)
    except (AttributeError, ConfigError, KeyError, TypeError, ValueError) as exc:
        raise _bad(path, f"layers.{name}: {first_line(exc)}") from None
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, shell)


def load_weights(model: nn.Module, path: Path) -> None:
    """The safetensors file into `model` (strict); a bad file is one line naming it. The
    safetensors format holds tensors only: nothing read here can run code."""
    from safetensors.torch import load_model  # optional dependency (the train extra)

    try:
        load_model(model, str(path), strict=True)
    except Exception as exc:  # safetensors raises its own SafetensorError (a bare Exception)
        raise _bad(path, f"cannot load ({first_line(exc)})") from None


# -- after loading: the values -------------------------------------------------------------


def check_tensors(model: nn.Module, layers: dict, path: Path) -> None:
    """Every exported layer's scales, steps and codes, as loaded."""
    for name in layers:
        m = model.get_submodule(name)
        problem = tensor_problem(m, layers[name])
        if problem is not None:
            raise _bad(path, f"layer {name}: {problem}")


def _positive(t: torch.Tensor | None, what: str) -> str | None:
    if t is None:
        return None
    t = t.detach().float()
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        return f"{what} {float(t[bad][0])!r}: scales and steps must be finite and > 0"
    return None


def _nonzero(t: torch.Tensor, what: str) -> str | None:
    t = t.detach().float()
    bad = ~(torch.isfinite(t) & (t != 0))
    if bool(bad.any()):
        return f"{what} {float(t[bad][0])!r}: steps must be finite and nonzero"
    return None


def _finite(t: torch.Tensor | None, what: str) -> str | None:
    if t is not None and not bool(torch.isfinite(t.detach().float()).all()):
        return f"{what}: not finite"
    return None


def tensor_problem(m: QuantizedLinear, lay: dict) -> str | None:
    """What is wrong with one loaded layer's values (`lay`: its layout), or None."""
    if m.fmt == "fp8":
        return _positive(m.scale, "scale") or _finite(m.codes.view(torch.float8_e4m3fn), "codes")
    if m.fmt == "nvfp4":
        block = m.block_scale.view(torch.float8_e4m3fn)
        return _positive(m.global_scale, "global_scale") or _nonnegative(block, "block_scale")
    if m.fmt == "nf4":  # an all-zero block of scales has absmax 0; the offset is their mean
        return _nonnegative(m.scale_absmax, "scale_absmax") or _finite(
            m.scale_offset, "scale_offset"
        )
    # Steps (L4Q, LSQ, a bit-switching store's scale and input steps) are trained parameters
    # with no sign constraint, and training does drive some below zero (a 3-step bit-switching
    # run of the tests ends with one at -0.0026): the forward, and the export's, is the same
    # function of them. A zero, NaN or infinite step is refused; fp8 / nvfp4 scales, amax
    # ratios, must be positive.
    if m.fmt in ("int8", "int4", "affine"):
        return (
            _nonzero(m.step, "step")
            or _finite(m.offset, "offset")
            or _code_problem(m)
            or _input_quantizer_problem(m.input_quantizer)
            or _switch_tensor_problem(m, lay)
        )
    return _input_quantizer_problem(m.input_quantizer)


def _nonnegative(t: torch.Tensor, what: str) -> str | None:
    t = t.float()
    bad = ~(torch.isfinite(t) & (t >= 0))
    if bool(bad.any()):
        return f"{what} {float(t[bad][0])!r}: must be finite and >= 0"
    return None


def _code_problem(m: QuantizedLinear) -> str | None:
    q = m.integer_codes()
    lo, hi = m.n, m.n + 2**m.bits - 1  # a b-bit code takes 2^b values from its lowest, n
    qmin, qmax = int(q.min()), int(q.max())
    if qmin < lo or qmax > hi:
        v = qmin if qmin < lo else qmax
        return f"integer code {v} outside the {m.bits}-bit range [{lo}, {hi}]"
    return None


def _input_quantizer_problem(iq) -> str | None:
    if iq is None:
        return None
    return _nonzero(iq.step, "input step") or _finite(iq.offset, "input offset")


def _switch_tensor_problem(m: QuantizedLinear, lay: dict) -> str | None:
    info = getattr(m, "switch", None)
    if info is None:
        return None
    if info.candidates != lay["switch"]["bits"]:  # the buffer, against the layout
        return f"switch.bits {info.candidates}: the layout says {lay['switch']['bits']}"
    hmt = float(info.hmt)
    if math.isinf(hmt):  # NaN: not measured (no HASB); any finite value is a trace estimate
        return f"switch.hmt {hmt}: the Hessian trace must be finite (or NaN: not measured)"
    return _nonzero(info.act_steps, "switch.act_steps")
