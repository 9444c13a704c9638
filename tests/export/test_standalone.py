"""An export loads alone (standalone.py): the base, the run and the tokenizer may be deleted,
the export moved and read from another working directory, and `lptrain eval` gives the same
validation loss. Two fine-tunes of a few steps, each from a relative `init.from` as the shipped
recipes have it: an lptrain base with a tokenizer.json, and a Hugging Face base that ships its
own (save_pretrained) tokenizer, which the run inherits. Plus `--format hf` with both kinds."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FAST, REPO, clean_env, sets, tiny_llama
from tests.trainer.test_finetune import in_process

L4Q = REPO / "recipes" / "finetune" / "l4q-4bit.yaml"  # init.from: runs/base (relative)
STEPS = 2


def byte_level_bpe():
    """A tokenizer.json tokenizer with 257 ids (256 bytes + one special), the vocabulary of
    the byte base: a run may start from that base with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=257,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(["lptrain"], trainer)
    assert tok.get_vocab_size() == 257
    return tok


def train(cwd: Path, *overrides: str) -> None:
    """`lptrain train L4Q --run-dir runs/l4q` in `cwd` (relative paths resolve there)."""
    cmd = [sys.executable, "-m", "lptrain", "train", str(L4Q), "--run-dir", "runs/l4q",
           *sets(*FAST, f"run.max_steps={STEPS}", *overrides)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def eval_loss(capsys, path) -> float:
    code, out, err = in_process(capsys, "eval", path, "--json", "--blocks", 8)
    assert code == 0, (out, err)
    return json.loads(out.splitlines()[-1])["loss"]


def export(capsys, *argv) -> None:
    code, out, err = in_process(capsys, "export", *argv, "--blocks", 8)
    assert code == 0, (out, err)


def test_an_lptrain_finetune_export_loads_alone(
    pretrained_base, data_cache, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    shutil.copytree(pretrained_base, work / "runs" / "base")
    (work / "tok").mkdir()
    byte_level_bpe().save(str(work / "tok" / "tokenizer.json"))
    train(work, f"data.cache_dir={data_cache}", "data.tokenizer=tok/tokenizer.json")
    monkeypatch.chdir(work)
    export(capsys, "runs/l4q", "--out", "exported")
    meta = json.loads(Path("exported/lptrain_export.json").read_text())
    assert meta["config"]["init"]["from"].startswith(str(work / "runs" / "base"))  # as the run
    assert meta["tokenizer"] == "tokenizer/tokenizer.json"
    assert (
        Path("exported/tokenizer/tokenizer.json").read_bytes()
        == Path("tok/tokenizer.json").read_bytes()
    )
    before = eval_loss(capsys, "exported")
    assert before == eval_loss(capsys, "runs/l4q")  # L4Q exports the training forward exactly

    # Another machine: the base, the run and the tokenizer gone, the export elsewhere.
    away = tmp_path / "elsewhere"
    shutil.move(str(work / "exported"), str(away / "copy"))
    shutil.rmtree(work)
    monkeypatch.chdir(away)
    assert eval_loss(capsys, "copy") == before


def test_a_hugging_face_finetune_export_loads_alone(data_cache, tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    work = tmp_path / "work"
    tiny_llama(work / "runs" / "base")
    bpe = byte_level_bpe()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    hf_tok.save_pretrained(str(work / "runs" / "base"))  # the run inherits the base's tokenizer
    bpe.save(str(work / "tokenizer.json"))
    train(work, f"data.cache_dir={data_cache}")
    monkeypatch.chdir(work)
    export(capsys, "runs/l4q", "--out", "exported")
    export(capsys, "runs/l4q", "--out", "exported-hf", "--format", "hf")
    meta = json.loads(Path("exported/lptrain_export.json").read_text())
    assert meta["tokenizer"] == "tokenizer" and meta["hf_config"]
    assert (work / "exported/tokenizer/tokenizer_config.json").is_file()
    before = eval_loss(capsys, "exported")
    assert before == eval_loss(capsys, "runs/l4q")

    # --format hf with a tokenizer.json run: the run's tokenizer, not the base's files.
    from lptrain.data import dataset
    from lptrain.export import fold, restore, to_hf, write

    opened = restore.open_run("runs/l4q")
    fold(opened.model)
    as_json = dataclasses.replace(opened, tok=dataset.load_tokenizer(str(work / "tokenizer.json")))
    with write.staging(work / "exported-hf-json") as tmp:
        to_hf.save(to_hf.plain_model(opened.model)[0], as_json, tmp)

    away = tmp_path / "elsewhere"
    away.mkdir()
    for name in ("exported", "exported-hf", "exported-hf-json"):
        shutil.move(str(work / name), str(away / name))
    shutil.rmtree(work)
    monkeypatch.chdir(away)
    assert eval_loss(capsys, "exported") == before
    text = "def f(x):\n    return x + 1  # ünïcode\n"
    want = bpe.encode(text).ids
    for name in ("exported-hf", "exported-hf-json"):
        tok = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
        assert tok(text)["input_ids"] == want, name
        assert transformers.AutoModelForCausalLM.from_pretrained(name, local_files_only=True)
    assert json.loads((away / "exported-hf/manifest.json").read_text())["files"]
