"""Every read of an export verifies it (validate.py), and writing one is staged safely
(write.py `check_target`, `staging`, `remove_stale`; switch.py through them).

The exports here are made in this process in a second: a nano decoder under bit switching
(8/6/4/2, calibrated on one batch, not trained), folded into its int8 stores and written by
`write.write_int` inside `write.staging`, as `lptrain export` does. Each test damages a copy
and checks that `lptrain eval` and `lptrain switch` refuse it with one line, exit 2."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.test_finetune import in_process

BITS = (8, 6, 4, 2)
LAYER = "layers.0.mlp.w1"  # a bit-switching layer of the nano decoder


def make_export(out: Path, cache: Path) -> Path:
    """A bit-switching export of a nano decoder (calibrated, untrained), written as
    `lptrain export` writes one."""
    from lptrain.config import schema
    from lptrain.data import dataset
    from lptrain.export import fold, restore, write
    from lptrain.models.decoder import build_model
    from lptrain.qat import bitswitch as bs

    cfg = schema.parse({
        "run": {"max_steps": 1},
        "model": {"preset": "nano"},
        "data": {"path": "embedded:pydoc-topics", "block_size": 64, "cache_dir": str(cache)},
        "deepspeed": {"micro_batch": 8},
    })  # fmt: skip
    tok = dataset.byte_tokenizer()
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size, 64)
    bs.prepare(model, bs.BitSwitchConfig(bits=BITS))
    tokens = torch.randint(1, 257, (4, 65), generator=torch.Generator().manual_seed(0))
    bs.calibrate(model, tokens)
    how = fold(model)
    opened = restore.Opened(cfg, model.eval(), tok, "in-process")
    with write.staging(out) as tmp:
        write.write_int(model, opened, how, {}, tmp)
    return out


@pytest.fixture(scope="module")
def original(tmp_path_factory, data_cache) -> Path:
    return make_export(tmp_path_factory.mktemp("validate") / "export", data_cache)


@pytest.fixture
def export(original, tmp_path) -> Path:
    """A copy of the export for one test to damage."""
    return Path(shutil.copytree(original, tmp_path / "export"))


def refused(capsys, *argv) -> str:
    """The one line a command refuses with (exit 2, no traceback)."""
    code, out, err = in_process(capsys, *argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, out, err)
    return err.strip()


def eval_loss(capsys, path) -> float:
    code, out, _ = in_process(capsys, "eval", path, "--json", "--blocks", 4)
    assert code == 0, out
    return json.loads(out.splitlines()[-1])["loss"]


def meta_of(export: Path) -> dict:
    return json.loads((export / "lptrain_export.json").read_text())


def rewrite(export: Path, meta: dict | None = None) -> None:
    """Change the export's JSON and write a manifest that vouches for it: what the layout and
    tensor checks must catch on their own (a hand-edited export, a buggy writer)."""
    from lptrain.checkpoint import manifest

    if meta is not None:
        (export / "lptrain_export.json").write_text(json.dumps(meta))
    (export / "manifest.json").unlink()
    manifest.write(export, {"kind": "lptrain export"})


def set_tensor(export: Path, key: str, value) -> None:
    """Overwrite one tensor of model.safetensors (same shape and dtype), manifest re-vouched."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(export / "model.safetensors"))
    t = tensors[key]
    tensors[key] = value(t.clone())
    save_file(tensors, str(export / "model.safetensors"))
    rewrite(export)


# -- the manifest: every file, checked before anything is read ----------------------------


def test_an_intact_export_verifies_and_evaluates(export, capsys):
    from lptrain.export import restore

    files = json.loads((export / "manifest.json").read_text())["files"]
    assert sorted(files) == ["lptrain_export.json", "model.safetensors"]  # byte: no tokenizer/
    assert meta_of(export)["tokenizer"] == "byte"
    assert restore.open_export(export).model is not None
    assert 4.0 < eval_loss(capsys, export) < 7.0  # an untrained 257-way model: about ln 257


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors missing"),
        (lambda d: os.truncate(d / "model.safetensors", 1000), "model.safetensors is 1000 bytes"),
        (lambda d: (d / "lptrain_export.json").write_text("{not json"), "lptrain_export.json is"),
        (lambda d: _flip_a_byte(d / "model.safetensors"), "model.safetensors checksum mismatch"),
        (lambda d: (d / "manifest.json").write_text("{"), "manifest.json unreadable"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json: an unfinished export, or "
                                                   "one written before lptrain verified exports; "
                                                   "export the run again"),
    ],
)  # fmt: skip
def test_a_damaged_export_is_refused_by_eval_and_switch(export, capsys, damage, message):
    damage(export)
    for argv in (["eval", export], ["switch", export, "--bits", 4, "--out", export.parent / "b4"]):
        err = refused(capsys, *argv)
        assert err.startswith(f"error: PATH: {export}: ") and message in err, err
    assert not (export.parent / "b4").exists()


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last byte of the last tensor: same size, other value
    path.write_bytes(bytes(data))


def test_checks_hold_without_the_manifest_vouching(export, capsys):
    """A truncated safetensors or invalid JSON that the manifest vouches for (a hand-edited
    export) is still one line naming the file."""
    os.truncate(export / "model.safetensors", 1000)
    rewrite(export)
    err = refused(capsys, "eval", export)
    assert err.startswith(f"error: PATH: {export / 'model.safetensors'}: cannot load"), err
    (export / "lptrain_export.json").write_text("[1, 2")
    rewrite(export)
    err = refused(capsys, "eval", export)
    assert err.startswith(f"error: PATH: {export / 'lptrain_export.json'}: unreadable"), err


# -- layouts: every name known ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("switch.rounding", "floor", "switch.rounding: unknown rounding 'floor' (known: nearest, "
                                     "shift)"),
        ("fmt", "int3", "fmt: unknown format 'int3'"),
        ("gemm", "fast", "gemm: unknown GEMM 'fast' (known: chunked, full)"),
        ("bits", 9, "bits: must be an integer in 1..8, got 9"),
        ("n", -5, "n: the lowest 8-bit code must be one of [-128, -127, 0], got -5"),
        ("group_size", 48, "group_size: must divide in_features 64, got 48"),
        ("switch.bits", [8, 4, 6, 2], "switch.bits: must be distinct integers in 2..8, highest"),
        ("input_quantizer.signed", "yes", "input_quantizer.signed: must be true or false"),
        ("recipe", "recipes/evil.yaml", "recipe: must be an inline recipe (a mapping) or null"),
    ],
)  # fmt: skip
def test_an_unknown_name_in_a_layout_is_refused(export, capsys, field, value, message):
    meta = meta_of(export)
    node = meta["layers"][LAYER]
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    rewrite(export, meta)
    for argv in (["eval", export], ["switch", export, "--bits", 4]):
        err = refused(capsys, *argv)
        want = f"error: PATH: {export / 'lptrain_export.json'}: layers.{LAYER}.{message}"
        assert err.startswith(want), err


def test_an_unknown_rounding_is_never_taken_as_floor():
    """double_rounding.second_round took any name but 'nearest' as floor (a right shift)."""
    from lptrain.qat.bitswitch import second_round

    i_h = torch.tensor([-7.0, -6.0, 5.0, 6.0, 127.0])
    assert second_round(i_h, 2, 6, "nearest").tolist() == [-2.0, -2.0, 1.0, 2.0, 31.0]
    assert second_round(i_h, 2, 6, "shift").tolist() == [-2.0, -2.0, 1.0, 1.0, 31.0]
    with pytest.raises(ValueError, match=r"rounding: expected one of \('nearest', 'shift'\)"):
        second_round(i_h, 2, 6, "floor")


# -- tensors: scales and codes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (f"{LAYER}.step", lambda t: t.index_fill_(0, torch.tensor([3]), float("nan")), "step nan"),
        (f"{LAYER}.step", lambda t: t.index_fill_(0, torch.tensor([0]), -math.inf), "step -inf"),
        (f"{LAYER}.step", lambda t: t.zero_(), "step 0.0: steps must be finite and nonzero"),
        (f"{LAYER}.input_quantizer.step", lambda t: t.fill_(0.0), "input step 0.0"),
        (f"{LAYER}.switch.act_steps", lambda t: t.index_fill_(0, torch.tensor([2]), float("nan")),
         "switch.act_steps nan"),
        (f"{LAYER}.switch.bits", lambda t: t.index_fill_(0, torch.tensor([1]), 5),
         "switch.bits [8, 5, 4, 2]: the layout says [8, 6, 4, 2]"),
    ],
)  # fmt: skip
def test_a_bad_scale_is_refused(export, capsys, key, value, message):
    set_tensor(export, key, value)
    for argv in (["eval", export], ["switch", export, "--bits", 4]):
        err = refused(capsys, *argv)
        want = f"error: PATH: {export / 'model.safetensors'}: layer {LAYER}: {message}"
        assert err.startswith(want), err


def test_a_negative_trained_step_loads(export, capsys):
    """Training leaves some steps below zero (no sign constraint on the parameter): the
    forward is the same function of them, so the export loads."""
    set_tensor(export, f"{LAYER}.step", lambda t: -t)
    set_tensor(export, f"{LAYER}.switch.act_steps", lambda t: -t)
    assert eval_loss(capsys, export) > 0
    assert in_process(capsys, "switch", export, "--bits", 2, "--blocks", 2)[0] == 0


def test_a_code_outside_its_bit_width_is_refused(export, capsys):
    """A 6-bit store keeps its codes in int8: 100 fits the byte, not the [-32, 31] grid."""
    meta = meta_of(export)
    lay = meta["layers"][LAYER]
    lay["bits"], lay["n"], lay["switch"]["bits"] = 6, -32, [6, 4, 2]
    rewrite(export, meta)
    set_tensor(export, f"{LAYER}.switch.bits", lambda t: t)  # shape (4,): the layout says 3
    err = refused(capsys, "eval", export)
    assert f"{export / 'model.safetensors'}: cannot load" in err  # a shape mismatch, one line
    set_tensor(export, f"{LAYER}.switch.bits", lambda t: torch.tensor([6, 4, 2]))
    set_tensor(export, f"{LAYER}.switch.act_steps", lambda t: t[:3].clone())
    set_tensor(export, f"{LAYER}.codes", lambda t: t.clamp(-32, 31))
    assert eval_loss(capsys, export) > 0  # consistent again: loads
    set_tensor(export, f"{LAYER}.codes", lambda t: t.index_fill_(1, torch.tensor([5]), 100))
    err = refused(capsys, "eval", export)
    assert err == (
        f"error: PATH: {export / 'model.safetensors'}: layer {LAYER}: integer code 100 outside "
        "the 6-bit range [-32, 31]"
    )


def test_nf4_layouts_and_scales_are_checked():
    """An nf4 layer (QLoRA's base, folded): its group must divide an even in_features; its
    second-level scales must be finite and >= 0 (an all-zero block has 0), its offset finite."""
    from lptrain.export import folding, validate
    from lptrain.qat import QuantizedLinear

    q = QuantizedLinear.from_weight(torch.randn(8, 64), "nf4", group_size=32)
    lay = folding.layout(q)
    assert validate.layout_problem(lay) is None and validate.tensor_problem(q, lay) is None
    assert validate.layout_problem({**lay, "group_size": 48}) == (
        "group_size: nf4 needs an even in_features 64 that it divides, got 48"
    )
    q.scale_absmax.fill_(0.0)
    assert validate.tensor_problem(q, lay) is None
    q.scale_offset.fill_(math.inf)
    assert validate.tensor_problem(q, lay) == "scale_offset: not finite"
    q.scale_absmax.fill_(-1.0)
    assert validate.tensor_problem(q, lay) == "scale_absmax -1.0: must be finite and >= 0"


# -- switching a switched export ----------------------------------------------------------


def test_switching_an_already_switched_export_says_so(original, tmp_path, capsys):
    b4, b2 = tmp_path / "b4", tmp_path / "b2"
    assert in_process(capsys, "switch", original, "--bits", 4, "--out", b4, "--blocks", 2)[0] == 0
    assert meta_of(b4)["switch"] == {"bits": 4}
    assert meta_of(b4)["config"] == meta_of(original)["config"]  # the run's, as recorded
    err = refused(capsys, "switch", b4, "--bits", 2, "--out", b2)
    assert err == (
        f"error: PATH: {b4} is an export already switched to 4 bits: it keeps no int8 store; "
        "switch from the original export or the run"
    )
    assert not b2.exists() and not list(tmp_path.glob("b2.tmp*"))


# -- staging: the target is checked first; half-written exports are never read ------------


@pytest.mark.parametrize("command", ["export", "switch"])
def test_an_unusable_target_fails_before_any_work(original, tmp_path, monkeypatch, capsys,
                                                  command):  # fmt: skip
    """--out under a regular file, or at a dangling symbolic link: one line naming the path
    and the OS error, before the run or export is opened (minutes for a big one): opening it
    is made to fail the test if it is reached."""
    from lptrain.export import restore, switch

    def never(*_a, **_k):
        raise AssertionError("the model was opened before --out was checked")

    monkeypatch.setattr(restore, "open_run", never)
    monkeypatch.setattr(switch, "open_stores", never)
    monkeypatch.setattr(restore, "locate_checkpoint", lambda p: (p, p / "checkpoints", "step1"))
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    source, args = (tmp_path, []) if command == "export" else (original, ["--bits", 4])
    under_file, dangling = tmp_path / "file" / "out", tmp_path / "dangling"
    err = refused(capsys, command, source, *args, "--out", under_file)
    assert err == f"error: --out: {under_file}: cannot write there (Not a directory)"
    err = refused(capsys, command, source, *args, "--out", dangling)
    assert err == f"error: --out: {dangling} already exists (a symbolic link to nothing); " + (
        "choose another --out"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file"]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)  # exited: no process has this PID (until it is reused)


def test_a_staging_folder_is_never_an_export_and_stale_ones_go(original, tmp_path, capsys):
    # A kill after the manifest and before the rename: every file there and verified, yet
    # refused by its name.
    stale = tmp_path / f"b4.tmp{_dead_pid()}"
    shutil.copytree(original, stale)
    err = refused(capsys, "eval", stale)
    assert err == (
        f"error: PATH: {stale}: the staging folder of an unfinished (killed) export; export again"
    )
    live = tmp_path / f"b4.tmp{os.getppid()}"  # a live process's: it may still be writing
    live.mkdir()
    code, out, _ = in_process(capsys, "switch", original, "--bits", 4, "--out", tmp_path / "b4",
                              "--blocks", 2)  # fmt: skip
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b4", live.name]
