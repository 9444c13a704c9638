"""`lptrain` end to end (cli.py): each tiny recipe trains and writes its run directory;
malformed recipes and flags give one line `error: <key.path>: <problem>`, exit 2, no traceback."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import yaml

from lptrain.cli import main
from tests.helpers import FAST, TINY, metrics, sets, train_losses

RECIPE = str(TINY / "tiny-fp32.yaml")
UNKNOWN_RECIPE = "error: precision.recipe: unknown recipe 'fp7'"

CASES = [
    # (id, extra argv after `train RECIPE`, expected start of the one stderr line)
    ("unknown key", sets("model.widht=3"), "error: model.widht: unknown key (known: preset, dim"),
    ("unknown section", sets("foo.bar=1"), "error: foo: unknown key"),
    (
        "wrong type",
        sets("run.max_steps=abc"),
        "error: run.max_steps: expected int or null, got str 'abc'",
    ),
    ("bool for int", sets("run.seed=true"), "error: run.seed: expected int, got bool True"),
    (
        "bad choice",
        sets("optim.decay=exp"),
        "error: optim.decay: expected one of 'cosine' | 'linear' | 'constant', got 'exp'",
    ),
    (
        "list type",
        sets("precision.skip=lm_head"),
        "error: precision.skip: expected a list, got str",
    ),
    (
        "zero stage",
        sets("deepspeed.zero_stage=4"),
        "error: deepspeed.zero_stage: must be 0, 1, 2 or 3",
    ),
    (
        "no max steps",
        sets("run.max_steps=null"),
        "error: run.max_steps: required (or give run.max_tokens)",
    ),
    (
        "batch sizes",
        sets("deepspeed.train_batch_size=32"),
        "error: deepspeed.train_batch_size: 32 != micro_batch 16 x grad_accum 1"
        " x world size 1 = 16",
    ),
    (
        "fp16 on cpu",
        sets("deepspeed.dtype=fp16"),
        "error: deepspeed.dtype: fp16 is not supported on CPU",
    ),
    (
        "owned ds key",
        sets("deepspeed.extra.gradient_clipping=0"),
        "error: deepspeed.extra.gradient_clipping: set by lptrain; use optim.grad_clip",
    ),
    (
        "missing data",
        sets("data.path=/nonexistent/corpus.txt"),
        "error: data.path: no such file or directory: /nonexistent/corpus.txt",
    ),
    (
        "missing tokenizer",
        sets("data.tokenizer=/nonexistent/tok.json"),
        "error: data.tokenizer: no such file or directory",
    ),
    (
        "missing resume",
        sets("checkpoint.resume=/nonexistent/ckpt"),
        "error: checkpoint.resume: no such checkpoint: /nonexistent/ckpt",
    ),
    ("unknown preset", sets("model.preset=huge"), "error: model.preset: unknown preset 'huge'"),
    ("heads", sets("model.n_heads=3"), "error: model.n_heads: 3 does not divide dim 128"),
    ("unknown recipe", sets("precision.recipe=fp7"), UNKNOWN_RECIPE),
    ("set syntax", ["--set", "run.max_steps"], "error: --set: expected KEY=VALUE"),
    ("set through scalar", sets("run.seed.x=1"), "error: run.seed: is not a section"),
    ("unknown flag", ["--bogus"], "error: unrecognized arguments: --bogus"),
]


@pytest.fixture(autouse=True)
def _restore_env():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse exits for flag errors
        code = exc.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(argv, expected, capsys):
    code, err = _run(["train", RECIPE, *argv], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(expected), err


def test_a_fast_backend_without_a_gpu_is_one_line_exit_2(capsys, monkeypatch, data_cache):
    from lptrain.nn import backends

    monkeypatch.setattr(backends, "_has_cuda", lambda: False)  # also on a machine with a GPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the backend tests' CPU interpreter
    recipe = str(TINY / "tiny-fp8.yaml")
    base = [*sets(*FAST, f"data.cache_dir={data_cache}", "run.max_steps=1")]
    for backend, why in (
        ("triton", "backend 'triton' is not available: "),
        ("te", "backend 'te' "),  # not installed, or installed without a CUDA device
    ):
        code, err = _run(["train", recipe, *base, *sets(f"precision.backend={backend}")], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: precision.backend: {why}"), err


def test_missing_recipe_file(capsys):
    code, err = _run(["train", "nope.yaml"], capsys)
    assert (code, err) == (2, "error: nope.yaml: no such recipe file\n")


def test_invalid_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  max_steps: [1,\n")
    code, err = _run(["train", str(bad)], capsys)
    assert code == 2 and err.startswith(f"error: {bad}: invalid YAML at line"), err


def test_inline_recipe_error_names_the_field(tmp_path, capsys):
    bad = tmp_path / "inline.yaml"
    bad.write_text(
        textwrap.dedent("""\
        precision:
          recipe: {name: custom, no_such_field: 1}
        run: {max_steps: 2}
    """)
    )
    code, err = _run(["train", str(bad)], capsys)
    assert code == 2 and err.startswith("error: precision.recipe: ") and err.count("\n") == 1, err
    assert "no_such_field" in err, err


def test_hub_dataset_offline_says_so(cli, data_cache):
    proc = cli("tiny-fp32.yaml", "data.path=wikitext", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(
        "error: data.path: 'wikitext' is not a local file or directory, nor a hub dataset cached "
        f"in {data_cache / 'hf'}"
    ), lines[0]
    assert "lptrain never downloads at run time" in lines[0]


def test_bad_data_is_one_line_and_writes_nothing(cli, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "fine"}\n{"text": "cut short"\n')
    run_dir = tmp_path / "run"
    proc = cli("tiny-fp32.yaml", f"data.path={corpus}", run_dir=run_dir, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
    # datasets' own "Failed to load JSON" log goes nowhere near the terminal (liblog.py)
    assert proc.stderr == (
        f"error: data.path: {corpus}:2: malformed JSON (Expecting ',' delimiter at column 21)\n"
    )
    assert not run_dir.exists()


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_tokenizer_without_its_package(cli, tmp_path):
    try:
        import tokenizers  # noqa: F401

        pytest.skip("the tokenizers package is installed here")
    except ImportError:
        pass
    tok = tmp_path / "tok.json"
    tok.write_text("{}")
    proc = cli("tiny-fp32.yaml", f"data.tokenizer={tok}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data.tokenizer: {tok} needs the `tokenizers` package (pip install tokenizers), "
        "or use tokenizer: byte"
    )


def test_help_and_recipes_listing(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--set KEY=VALUE" in out and "--run-dir DIR" in out and "exit status" in out
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "recipes/pretrain/tiny-fp8.yaml" in out and "  fp32\n" in out


HIGH = ["tiny-fp32.yaml", "tiny-bf16.yaml"]


QUANTIZED = ["tiny-fp8.yaml", "tiny-nvfp4.yaml", "tiny-quartet.yaml", "tiny-int16-dfp.yaml"]


STEPS = 12


def _check_run(proc, run_dir, recipe_name: str):
    assert proc.stdout.strip().splitlines()[-1] == f"run directory: {run_dir.resolve()}"
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["run"]["max_steps"] == STEPS and cfg["model"]["preset"] == "nano"
    assert cfg["run"]["name"] == recipe_name.removesuffix(".yaml")
    ds = json.loads((run_dir / "deepspeed.json").read_text())
    assert ds["gradient_clipping"] == 1.0 and ds["optimizer"]["params"]["torch_adam"] is True
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    val = [r for r in metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in val] == [6, 12]
    losses = train_losses(run_dir)
    # From ln(320) ~ 5.8 at init, byte-level loss falls by more than 1 nat in 12 steps at lr 1e-2.
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000012"


@pytest.mark.parametrize("recipe", HIGH + QUANTIZED)
def test_tiny_recipe_trains(cli, tmp_path, recipe):
    run_dir = tmp_path / "run"
    proc = cli(recipe, f"run.max_steps={STEPS}", "run.eval_interval=6", run_dir=run_dir)
    _check_run(proc, run_dir, recipe)
