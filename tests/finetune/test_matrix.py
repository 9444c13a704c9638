"""The fine-tuning matrix (issue 23): every architecture x every fine-tuning recipe x every
export format, at the smallest sizes (2 layers, width 64, blocks of 32 tokens, 2 steps).

Architectures: GPT-2 (transformers' Conv1D, W stored (in, out); biases; a tied head), Llama
and Qwen2 (q/k/v biases, grouped-query attention), each built from a tiny config with random
weights. Each (architecture, recipe) trains once, through `lptrain.cli.main` (the CLI's code;
all in one subprocess, so that DeepSpeed's process group and environment never reach the test
process), and both formats export it. What each format must give:

* `int`: `lptrain eval` of the export equals the folded model's loss exactly (the export is
  the folded model bit for bit), and for L4Q and LSQ the run's own `lptrain eval` exactly
  (their fold is the training forward). LoRA folds re-quantize W + BA into the base's format:
  that cost is reported, not bounded here.
* `compressed-tensors`: the export's own reload in transformers (recorded in
  lptrain_compressed.json) equals the int export's loss within CT_BOUND; a run with nothing to
  store quantized (a bf16, nvfp4 or nf4 base, GPT-2 whose layers are all Conv1D) is refused
  in one line.
* `hf`: `AutoModelForCausalLM.from_pretrained` of the export gives the folded model's loss
  within HF_BOUND. The weights are the same fp32 values; only the GEMMs differ (lptrain's
  row-chunked dequantizing GEMM against `F.linear`: another summation order of at most 256
  products, ~1e-7 relative per logit), so 1e-5 nats is tight and still far above that. LSQ's
  8-bit input quantizers have no place in a plain transformers model (the export says it drops
  them): its reference is the folded model with those quantizers off, and the cost of dropping
  them is reported.

One case per architecture runs `lptrain export` as a user does (a subprocess; CLI_CASES);
the others call the same `main` in this process. A new export format is one FORMATS entry.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FAST, REPO, clean_env, lptrain, sets, tiny_gpt2, tiny_llama, tiny_qwen2

pytest.importorskip("transformers")

FINETUNE = REPO / "recipes" / "finetune"
ARCHS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "qwen2": tiny_qwen2}
RECIPES = {  # name: (recipes/finetune/<file>.yaml, overrides)
    "lora-bf16": ("lora-bf16base", ()),
    "lora-fp8": ("lora-fp8base", ()),
    "lora-int4": ("qlora-int4", ()),
    "lora-nvfp4": ("qlora-int4", ("adapters.base=nvfp4",)),
    "lora-nf4": ("qlora-nf4", ()),
    "l4q-4bit": ("l4q-4bit", ()),
    "lsq-w4a8": ("lsq-w4a8", ()),
}
EXACT = ("l4q-4bit", "lsq-w4a8")  # the int export is the training forward bit for bit
CLI_CASES = {("gpt2", "lora-int4", "hf"), ("llama", "l4q-4bit", "int"), ("qwen2", "lsq-w4a8", "hf")}
SMALL = [*FAST, "data.block_size=32", "deepspeed.micro_batch=4", "run.max_steps=2",
         "data.tokenizer=byte"]  # fmt: skip
BLOCKS = 4  # validation blocks for every loss below
HF_BOUND = 1e-5  # nats: see the module docstring
# nats: compressed-tensors dequantizes (q - z)·s where lptrain computes s·q + b, in fp32, then
# the same F.linear difference as hf (measured up to 5.3e-8 on a tiny Llama)
CT_BOUND = 1e-5
FIGURES: dict[tuple[str, str], dict] = {}  # (arch, recipe) -> losses, printed at the end

# Every run through the CLI's main, one process for all of them (imports paid once).
TRAIN_ALL = """import json, sys
from lptrain.cli import main
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    if code:
        sys.exit(f"exit {code}: lptrain {' '.join(argv)}")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("matrix")
    bases = {arch: make(root / f"base-{arch}") for arch, make in ARCHS.items()}
    runs = {(a, r): root / f"{a}-{r}" for a in ARCHS for r in RECIPES}
    argvs = [
        ["train", str(FINETUNE / f"{RECIPES[r][0]}.yaml"), "--run-dir", str(d),
         *sets(*SMALL, f"data.cache_dir={data_cache}", f"init.from={bases[a]}", *RECIPES[r][1])]
        for (a, r), d in runs.items()
    ]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", TRAIN_ALL, json.dumps(argvs)], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    yield runs
    _print_figures()


def _print_figures() -> None:
    print("\narch  recipe      run eval  int export  hf reload  |hf - int|  ct reload  |ct - int|")
    for (arch, recipe), f in sorted(FIGURES.items()):
        if {"run", "int", "hf"} <= f.keys():
            ct = f"{f['ct']:10.4f} {abs(f['ct'] - f['int']):10.2e}" if "ct" in f else "   refused"
            print(f"{arch:5} {recipe:10} {f['run']:9.4f} {f['int']:11.4f} {f['hf']:10.4f} "
                  f"{abs(f['hf'] - f['int']):10.2e} {ct}")  # fmt: skip


def _main(capsys, *argv) -> str:
    """`lptrain ARGV` through the CLI's main in this process; its stdout."""
    from lptrain.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def _eval(capsys, path: Path) -> float:
    out = _main(capsys, "eval", path, "--json", "--blocks", BLOCKS)
    return json.loads(out.splitlines()[-1])["loss"]


def _export(capsys, arch: str, recipe: str, fmt: str, run: Path, out: Path) -> str:
    argv = ["export", run, "--format", fmt, "--out", out, "--blocks", BLOCKS]
    if (arch, recipe, fmt) in CLI_CASES:
        return lptrain(*argv).stdout  # as a user runs it
    return _main(capsys, *argv)


def int_export(capsys, runs, arch: str, recipe: str) -> dict:
    """The run's int export (made once, here) and its losses: the run's `lptrain eval`, the
    export's, and the folded model's that the export recorded when it wrote itself."""
    if "int" not in FIGURES.setdefault((arch, recipe), {}):
        run = runs[arch, recipe]
        out = run.parent / f"{run.name}-int"
        _export(capsys, arch, recipe, "int", run, out)
        recorded = json.loads((out / "lptrain_export.json").read_text())["val_loss"]
        FIGURES[arch, recipe].update(
            run=_eval(capsys, run), int=_eval(capsys, out), folded=recorded["export"], path=out
        )
    return FIGURES[arch, recipe]


def check_int(capsys, runs, arch: str, recipe: str) -> None:
    f = int_export(capsys, runs, arch, recipe)
    assert f["int"] == f["folded"]  # the export is the folded model, bit for bit
    if recipe in EXACT:
        assert f["int"] == f["run"]
    assert math.isfinite(f["int"]) and abs(f["int"] - f["run"]) < 0.1  # a fold that broke it


def check_hf(capsys, runs, arch: str, recipe: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from lptrain.export import evaluate, restore
    from lptrain.models import hf
    from lptrain.qat import QuantizedLinear

    out = runs[arch, recipe].parent / f"{arch}-{recipe}-hf"
    stdout = _export(capsys, arch, recipe, "hf", runs[arch, recipe], out)
    back = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    # The reference: `lptrain eval` of the int export; its data and tokenizer give the blocks.
    ref = int_export(capsys, runs, arch, recipe)
    exported = restore.open_export(ref["path"])
    drops_inputs = "inputs stay in float" in stdout
    assert drops_inputs == (recipe == "lsq-w4a8"), stdout
    if drops_inputs:  # what the hf model computes: the int export without its input quantizers
        for m in exported.model.modules():
            if isinstance(m, QuantizedLinear):
                m.input_quantizer = None
    with torch.no_grad():
        loss = evaluate.evaluate(hf.HFCausalLM(back), exported.cfg, exported.tok, max_blocks=BLOCKS)
        want = evaluate.evaluate(exported.model, exported.cfg, exported.tok, max_blocks=BLOCKS)
    assert abs(loss.loss - want.loss) <= HF_BOUND, (loss, want)
    if not drops_inputs:
        assert want.loss == ref["int"]
    assert f"hf: reloaded by transformers: val_loss {loss.loss:.4f}" in stdout
    FIGURES[arch, recipe]["hf"] = loss.loss


def check_ct(capsys, runs, arch: str, recipe: str) -> None:
    """compressed-tensors: what `from_pretrained` computes from the written files (the export
    reloads itself and records it) equals the int export's `lptrain eval` within CT_BOUND. A
    run with nothing to store quantized is refused: a bf16 base; GPT-2, all Conv1D; an nvfp4
    base, which compressed-tensors 0.20 decompresses to bf16 in any model; nf4, which it
    lacks."""
    from lptrain.cli import main

    out = runs[arch, recipe].parent / f"{arch}-{recipe}-ct"
    argv = ["export", runs[arch, recipe], "--format", "compressed-tensors", "--out", out,
            "--blocks", BLOCKS]  # fmt: skip
    if arch == "gpt2" or recipe in ("lora-bf16", "lora-nvfp4", "lora-nf4"):
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2
        assert "no layer can be stored quantized" in capsys.readouterr().err
        assert not out.exists()
        return
    _export(capsys, arch, recipe, "compressed-tensors", runs[arch, recipe], out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    got = json.loads((out / "lptrain_compressed.json").read_text())["val_loss"]
    ref = int_export(capsys, runs, arch, recipe)
    assert abs(got["compressed-tensors"] - ref["int"]) <= CT_BOUND, (got, ref["int"])
    FIGURES[arch, recipe]["ct"] = got["compressed-tensors"]


FORMATS = {"int": check_int, "hf": check_hf, "compressed-tensors": check_ct}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_fine_tune_and_export(runs, arch, recipe, fmt, capsys):
    FORMATS[fmt](capsys, runs, arch, recipe)


def test_block_longer_than_the_positions_is_one_line(tmp_path, data_cache):
    """GPT-2 embeds at most n_positions positions: a longer block is refused before the run
    directory is written (it was an IndexError in the first step, the directory left behind).
    A subprocess: `lptrain train` sets up torch.distributed before it reads the base."""
    base = tiny_gpt2(tmp_path / "gpt2", n_positions=16)
    run = tmp_path / "run"
    proc = lptrain("train", FINETUNE / "qlora-int4.yaml", "--run-dir", run,
                   *sets(*SMALL, f"data.cache_dir={data_cache}", f"init.from={base}"),
                   check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data.block_size: 32 is longer than the model at {base} handles (n_positions: 16)"
    )
    assert not run.exists()
