"""What lptrain reads from a run directory someone else made (store.verify, safeload.py,
restore.find_checkpoint, base.py): a pickled payload never runs, under `eval`, `export`,
`init.from` or a resume; every reader verifies and falls back to the newest checkpoint that
does, in one line, or refuses; a checkpoint is read with its own config; a fine-tune needs its
base only to start."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lptrain.checkpoint import manifest
from tests.helpers import FAST, REPO, TINY, lptrain, sets, tiny_llama, train_losses

MODEL_STATES = "mp_rank_00_model_states.pt"


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def train(run: Path, cache: Path, *overrides: str, recipe=TINY / "tiny-fp32.yaml", **kw):
    return lptrain("train", recipe, "--run-dir", run,
                   *sets(*FAST, f"data.cache_dir={cache}", "data.path=embedded:pydoc-topics",
                         *overrides), **kw)  # fmt: skip


def val_loss(proc) -> float:
    return json.loads(proc.stdout.strip().splitlines()[-1])["loss"]


def reseal(tag: Path) -> None:
    """Re-write the manifest to match the files as they are now: what a sender controls."""
    meta = {k: v for k, v in json.loads((tag / manifest.NAME).read_text()).items()
            if k not in ("files", "format")}  # fmt: skip
    (tag / manifest.NAME).unlink()
    manifest.write_local(tag, meta)


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory, data_cache) -> Path:
    """A nano run (ZeRO-1: DeepSpeed's optimizer records in the files) saved at steps 1 and 2."""
    run = tmp_path_factory.mktemp("trust") / "run"
    train(run, data_cache, "run.max_steps=2", "checkpoint.interval=1", "deepspeed.zero_stage=1")
    return run


@pytest.fixture
def copy(two_saves, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(two_saves, out)
    return out


def tag(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step{step:08d}"


def evaluate(path: Path, **kw):
    return lptrain("eval", path, "--json", "--blocks", 8, **kw)


def test_a_pickled_payload_never_runs(copy, tmp_path, data_cache):
    """The newest checkpoint's model states carry a payload and a manifest re-written to
    match: eval, export, init.from and resume read step 1 instead, each saying so; the tag
    itself is refused; the payload never runs."""
    marker = tmp_path / "ran"
    good = evaluate(copy / "checkpoints" / "step00000001")
    newest = tag(copy, 2)
    blob = torch.load(newest / MODEL_STATES, weights_only=True)
    blob["payload"] = Payload(marker)
    torch.save(blob, newest / MODEL_STATES)
    reseal(newest)

    ev = evaluate(copy)
    assert "reading step00000001, the newest that verifies" in ev.stderr
    assert "step00000002: mp_rank_00_model_states.pt: refused: it holds posix.system" in ev.stderr
    assert val_loss(ev) == val_loss(good)
    refused = lptrain("eval", newest, check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "does not verify" in refused.stderr and "refused" in refused.stderr
    out = lptrain("export", copy, "--out", tmp_path / "export", "--blocks", 4)
    assert (
        "step00000001"
        in json.loads((tmp_path / "export" / "lptrain_export.json").read_text())["source"]
    ), out.stdout
    ft = train(tmp_path / "ft", data_cache, f"init.from={copy}", "run.max_steps=1",
               recipe=REPO / "recipes" / "finetune" / "lora-bf16base.yaml")  # fmt: skip
    assert "init: using step00000001" in ft.stderr
    resumed = train(copy, data_cache, "run.max_steps=3", "deepspeed.zero_stage=1")
    assert "resuming from step00000001, the newest that verifies" in resumed.stderr
    assert not marker.exists()


def test_a_payload_in_a_side_file_is_refused_by_a_resume(copy, tmp_path, data_cache):
    marker = tmp_path / "ran"
    for step in (1, 2):  # no checkpoint verifies: the resume refuses, nothing is overwritten
        side = tag(copy, step) / "lptrain_rank0.pt"
        blob = torch.load(side, weights_only=True)
        torch.save({**blob, "extra": {"monitoring": Payload(marker)}}, side)
        reseal(tag(copy, step))
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    proc = train(copy, data_cache, "run.max_steps=3", "deepspeed.zero_stage=1", check=False)
    assert proc.returncode == 2 and "no checkpoint in" in proc.stderr and "refused" in proc.stderr
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before
    assert not marker.exists()


def test_corruption_falls_back_in_one_line(copy):
    """One overwritten embedding value (same size, manifest untouched), a truncated file and a
    manifest that lists no files: each makes the reader use the checkpoint before it."""
    good = val_loss(evaluate(tag(copy, 1)))
    newest = tag(copy, 2)
    path = newest / MODEL_STATES
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = b"\xff\xff\xff\x7f"  # a NaN's worth of bytes
    path.write_bytes(bytes(data))
    ev = evaluate(copy)
    assert "step00000002: mp_rank_00_model_states.pt checksum mismatch" in ev.stderr
    assert val_loss(ev) == good
    path.write_bytes(bytes(data[:1000]))
    ev = evaluate(copy)
    assert "mp_rank_00_model_states.pt is 1000 bytes" in ev.stderr and val_loss(ev) == good
    meta = json.loads((newest / manifest.NAME).read_text())
    (newest / manifest.NAME).write_text(json.dumps({**meta, "files": {}}))
    ev = evaluate(copy)
    assert "manifest.json lacks config.yaml" in ev.stderr and val_loss(ev) == good


def test_sealed_damage_falls_back_or_is_refused(copy, tmp_path, data_cache):
    """Damage a sender re-seals (the manifest re-written to match): a config.yaml that builds a
    Python object, a manifest without the ZeRO stage; `latest` naming a missing tag; a NaN
    weight. Each reader falls back to step 1 in one line, or refuses; init.from as well."""
    good = val_loss(evaluate(tag(copy, 1)))
    newest = tag(copy, 2)
    config = (newest / "config.yaml").read_text()
    (newest / "config.yaml").write_text(config + "x: !!python/object/apply:os.system ['true']\n")
    reseal(newest)
    ev = evaluate(copy)
    assert "step00000002: config.yaml unreadable (ConstructorError)" in ev.stderr
    assert val_loss(ev) == good
    resumed = train(copy, data_cache, "run.max_steps=2", "deepspeed.zero_stage=1",
                    "checkpoint.keep_last=3")  # fmt: skip
    assert "resuming from step00000001, the newest that verifies" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    shutil.rmtree(newest)  # the resume just wrote a good step 2: damage it another way
    shutil.copytree(tag(copy, 1), newest)
    meta = json.loads((newest / manifest.NAME).read_text())
    del meta["zero_stage"]
    (newest / manifest.NAME).write_text(json.dumps({**meta, "step": 2, "tag": newest.name}))
    ev = evaluate(copy)
    assert "step00000002: manifest.json lacks zero_stage" in ev.stderr and val_loss(ev) == good
    shutil.rmtree(newest)
    (copy / "checkpoints" / "latest").write_text("step00000009")
    ft = train(tmp_path / "ft", data_cache, f"init.from={copy}", "run.max_steps=1",
               recipe=REPO / "recipes" / "finetune" / "lora-bf16base.yaml")  # fmt: skip
    assert "init: using step00000001" in ft.stderr and "step00000009" in ft.stderr
    state = torch.load(tag(copy, 1) / MODEL_STATES, weights_only=True)
    state["module"]["embed.weight"][3, 5] = float("nan")
    torch.save(state, tag(copy, 1) / MODEL_STATES)
    reseal(tag(copy, 1))
    refused = lptrain("eval", copy, check=False)
    assert refused.returncode == 2 and "embed.weight hold NaN or Inf" in refused.stderr


def test_the_converter_never_imports_from_the_working_directory(two_saves, tmp_path, monkeypatch):
    """`ds_to_universal` runs as `python -P -m ...`: a `deepspeed/` package in the working
    directory (a received run directory) is not imported in its place."""
    from lptrain.checkpoint import elastic, store

    work = tmp_path / "received"
    shutil.copytree(two_saves, work)
    (work / "deepspeed").mkdir()
    (work / "deepspeed" / "__init__.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    monkeypatch.chdir(work)
    found, _ = store.newest_verified(work / "checkpoints")
    out = elastic.ensure_universal(found, work / "checkpoints", say=lambda _m: None)
    assert (out / manifest.NAME).is_file() and not (tmp_path / "ran").exists()


def test_a_checkpoint_is_read_with_its_own_config(two_saves, tmp_path, data_cache):
    """An fp8 run's checkpoint placed, as the newest, in an fp32 run: eval reads it as fp8 (its
    own config.yaml), exactly as in its own run."""
    other = tmp_path / "fp8"
    train(other, data_cache, "run.max_steps=3", recipe=TINY / "tiny-fp8.yaml")
    mixed = tmp_path / "mixed"
    shutil.copytree(two_saves, mixed)
    shutil.copytree(tag(other, 3), tag(mixed, 3))
    assert val_loss(evaluate(mixed)) == val_loss(evaluate(other))


def test_a_fine_tune_outlives_its_base(pretrained_base, tmp_path, data_cache):
    """init.from is recorded as an absolute path with the base's hash; after the base is
    gone, eval gives the same loss and a resume continues bit for bit as an uninterrupted run;
    a different base is refused naming the expected one."""
    base = tmp_path / "base"
    shutil.copytree(pretrained_base, base)
    recipe = REPO / "recipes" / "finetune" / "lora-bf16base.yaml"
    whole, ft = tmp_path / "whole", tmp_path / "ft"
    train(whole, data_cache, f"init.from={base}", "run.max_steps=3", recipe=recipe)
    train(ft, data_cache, f"init.from={base}", "run.max_steps=2", recipe=recipe)
    record = json.loads((ft / "base" / "base.json").read_text())
    assert record["path"] == str(tag(base, 4)) and len(record["sha256"]) == 64
    assert (tag(ft, 2) / "base" / "base.json").is_file()
    before = val_loss(evaluate(ft))
    shutil.rmtree(base)
    assert val_loss(evaluate(ft)) == before
    proc = train(ft, data_cache, "init.from=runs/somewhere", "run.max_steps=3", recipe=recipe)
    assert "init: runs/somewhere is not readable from here; not needed" in proc.stderr
    assert str(tag(base, 4)) in proc.stderr
    assert train_losses(ft) == train_losses(whole)
    wrong = train(ft, data_cache, f"init.from={whole}", "run.max_steps=4", recipe=recipe,
                  check=False)  # fmt: skip
    assert wrong.returncode == 2 and "is not the base this run started from" in wrong.stderr


def test_a_hugging_face_fine_tune_outlives_its_base(tmp_path, data_cache):
    """The run keeps the Hugging Face base's config.json and tokenizer files (RUN/base and
    every checkpoint): with the model directory deleted, eval is unchanged and a resume
    continues bit for bit."""
    hf_dir = tiny_llama(tmp_path / "hf-llama")
    recipe = REPO / "recipes" / "finetune" / "l4q-4bit.yaml"
    whole, ft = tmp_path / "whole", tmp_path / "ft"
    byte = "data.tokenizer=byte"  # the model ships no tokenizer
    train(whole, data_cache, f"init.from={hf_dir}", byte, "run.max_steps=2", recipe=recipe)
    train(ft, data_cache, f"init.from={hf_dir}", byte, "run.max_steps=1", recipe=recipe)
    assert (tag(ft, 1) / "base" / "config.json").is_file()
    before = val_loss(evaluate(ft))
    shutil.rmtree(hf_dir)
    assert val_loss(evaluate(ft)) == before
    proc = train(ft, data_cache, f"init.from={hf_dir}", byte, "run.max_steps=2", recipe=recipe)
    assert "is not readable from here; not needed" in proc.stderr
    assert train_losses(ft) == train_losses(whole)


def test_a_malformed_base_record_is_one_line(tmp_path):
    """RUN/base/base.json is read from checkpoints others made: absent means no base;
    unreadable or incomplete is a ConfigError naming the file, never a KeyError."""
    from lptrain.checkpoint import base
    from lptrain.errors import ConfigError

    assert base.read_copy(tmp_path, "PATH") is None
    (tmp_path / "base").mkdir()
    for text in (
        "{not json",
        '{"kind": "hf"}',
        '["path"]',
        '{"kind": "x", "path": "p", "sha256": "h"}',
    ):
        (tmp_path / "base" / "base.json").write_text(text)
        with pytest.raises(ConfigError, match=r"^PATH: .*base\.json: (unreadable|malformed)"):
            base.read_copy(tmp_path, "PATH")
    (tmp_path / "base" / "base.json").write_text('{"kind": "hf", "path": "/p", "sha256": "h"}')
    assert base.read_copy(tmp_path, "PATH").source.config_only
