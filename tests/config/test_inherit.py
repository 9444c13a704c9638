"""What a fine-tune takes from its base (lptrain/config/inherit.py): a Hugging Face directory's
own tokenizer (ids as `AutoTokenizer` gives them), a refusal when it ships none unless
`data.tokenizer: byte` asks for lptrain's byte tokenizer, and a vocabulary the model's
embedding cannot hold refused with both sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lptrain.config import schema
from lptrain.config.inherit import tokenizer_spec
from lptrain.data import dataset
from lptrain.errors import ConfigError
from tests.helpers import FAST, REPO, lptrain, sets, tiny_llama

TEXT = "def f(x):\n    return x + 1  # a few words, ünïcode\n"


def _bpe_tokenizer(vocab: int):
    """A BPE trained here (`tokenizers`), as a transformers tokenizer with an EOS token."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator([TEXT * 4, "the quick brown fox jumps over the lazy dog"], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _cfg(base: Path, *overrides: str) -> schema.TrainConfig:
    raw = {"run": {"max_steps": 1}, "init": {"from": str(base)}}
    for kv in overrides:
        schema.apply_override(raw, kv)
    return schema.parse(raw)


def test_the_models_own_tokenizer_is_used(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_dir = tiny_llama(tmp_path / "llama", vocab_size=320)
    _bpe_tokenizer(300).save_pretrained(str(hf_dir))
    spec = tokenizer_spec(_cfg(hf_dir))
    assert spec == str(hf_dir)
    ours = dataset.load_tokenizer(spec)
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    assert list(ours.encode(TEXT)) == theirs(TEXT)["input_ids"]
    assert max(ours.encode(TEXT)) > 256  # merges: not byte ids
    assert (ours.vocab_size, ours.eos) == (len(theirs), theirs.eos_token_id)


def test_a_model_without_a_tokenizer_needs_byte_asked_for(tmp_path):
    hf_dir = tiny_llama(tmp_path / "llama")
    with pytest.raises(ConfigError, match=r"^data.tokenizer: the model at .* ships no tokenizer"):
        tokenizer_spec(_cfg(hf_dir))
    assert tokenizer_spec(_cfg(hf_dir, "data.tokenizer=byte")) == "byte"
    # Without a base, unset is lptrain's byte tokenizer (what config.yaml records).
    assert schema.parse({"run": {"max_steps": 1}}).data.tokenizer == "byte"


def test_a_vocabulary_larger_than_the_embedding_is_refused(tmp_path):
    from lptrain.models import converters

    hf_dir = tiny_llama(tmp_path / "llama")  # embeds 257 ids
    _bpe_tokenizer(300).save_pretrained(str(hf_dir))
    tok = dataset.load_tokenizer(tokenizer_spec(_cfg(hf_dir)))
    (init,) = converters.build(_cfg(hf_dir), ("init",))
    ctx = converters.ConvertContext(0, 0, 1, print, vocab_size=tok.vocab_size)
    with pytest.raises(ConfigError, match=r"^data.tokenizer: 300 token ids .* embeds 257$"):
        init.convert(None, ctx)


def test_the_refusal_is_one_line_and_writes_nothing(tmp_path):
    hf_dir = tiny_llama(tmp_path / "llama")
    run = tmp_path / "run"
    proc = lptrain(
        "train", REPO / "recipes" / "finetune" / "l4q-4bit.yaml", "--run-dir", run,
        *sets(*FAST, f"init.from={hf_dir}", "run.max_steps=1"), check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "data.tokenizer: the model at" in errors[0], errors
    assert "or to byte" in errors[0]
    assert not run.exists() or not any(p.name != "lptrain.lock" for p in run.iterdir())
