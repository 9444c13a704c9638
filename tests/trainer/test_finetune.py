"""Fine-tuning end to end (init_from.py, finetune_config.py, converters, export.py,
evaluate.py, restore.py, recipes/finetune/): a nano base pretrained once for the module, each
fine-tune recipe for a few steps under ZeRO-2, exact resume, two ranks, export bit for bit,
eval, a tiny Hugging Face Llama made here, and bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lptrain.errors import ConfigError
from tests.helpers import FAST, REPO, free_port, lptrain, sets, tiny_llama, train_losses

FINETUNE = REPO / "recipes" / "finetune"
NAMES = ["lora-bf16base", "qlora-int4", "qlora-nf4", "lora-fp8base", "l4q-4bit", "l4q-3bit",
         "lsq-w4a8"]  # fmt: skip
STEPS = 3


def finetune(name: str, run_dir: Path, base: Path, cache: Path, *overrides, **kw):
    return lptrain(
        "train", FINETUNE / f"{name}.yaml", "--run-dir", run_dir,
        *sets(*FAST, f"data.cache_dir={cache}", f"init.from={base}",
              f"run.max_steps={STEPS}", "run.eval_interval=0", *overrides),
        **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def work(tmp_path_factory, data_cache, pretrained_base) -> dict:
    """The nano base (pretrained briefly) and one fine-tune run per recipe."""
    root = tmp_path_factory.mktemp("finetune")
    base = pretrained_base
    runs = {}
    for name in NAMES:
        runs[name] = root / name
        finetune(name, runs[name], base, data_cache)
    return {"root": root, "base": base, "cache": data_cache, "runs": runs}


def test_every_recipe_fine_tunes_only_its_tensors(work):
    from lptrain.models import init_from

    base = init_from.load_state(work["base"] / "checkpoints", "step00000004")
    for name, run in work["runs"].items():
        assert len(train_losses(run)) == STEPS, name
        state = init_from.load_state(run / "checkpoints", f"step{STEPS:08d}")
        if name.startswith(("lora", "qlora", "l4q")):  # the embedding is frozen
            assert torch.equal(state["embed.weight"], base["embed.weight"]), name
        if name.startswith("l4q"):  # W0 kept, untouched
            assert torch.equal(state["layers.0.attn.wq.weight"], base["layers.0.attn.wq.weight"])
        if name == "lsq-w4a8":  # full QAT trains the weights
            assert not torch.equal(
                state["layers.0.attn.wq.base.weight"], base["layers.0.attn.wq.weight"]
            )


@pytest.mark.parametrize("name", ["l4q-4bit", "qlora-nf4"])
def test_resume_is_exact(work, tmp_path, name):
    run = tmp_path / "resumed"
    finetune(name, run, work["base"], work["cache"], "run.stop_at_step=2")
    finetune(name, run, work["base"], work["cache"])
    assert train_losses(run) == train_losses(work["runs"][name])


@pytest.mark.slow
def test_two_ranks_match_one(work, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", "2", "--master_port", str(free_port())]  # fmt: skip
    two = tmp_path / "two"
    finetune("qlora-int4", two, work["base"], work["cache"], "deepspeed.micro_batch=4",
             "deepspeed.train_batch_size=8", launcher=torchrun, timeout=300)  # fmt: skip
    a, b = train_losses(work["runs"]["qlora-int4"]), train_losses(two)
    assert len(a) == len(b) == STEPS
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b, strict=True)), (a, b)


def in_process(capsys, *argv) -> tuple[int, str, str]:
    """`lptrain export` / `eval` run in this process (no DeepSpeed engine): (code, out, err)."""
    from lptrain.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["l4q-4bit", "lsq-w4a8", "qlora-int4", "qlora-nf4"])
def test_export_round_trip_and_eval(work, name, capsys):
    from lptrain.export import restore

    run = work["runs"][name]
    code, out, _ = in_process(capsys, "export", run, "--blocks", 16)
    assert code == 0 and "val_loss trained" in out and f"export: {run / 'export'}" in out
    trained, exported = restore.open_run(run), restore.open_export(run / "export")
    tokens = torch.randint(1, 257, (2, 65), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = trained.model.logits(tokens[:, :-1])
        b = exported.model.logits(tokens[:, :-1])
    if name.startswith("qlora"):  # folded into the 4-bit base: close, not equal (it says so)
        assert f"re-quantized to {name.removeprefix('qlora-')}" in out
        assert 0 < (a - b).abs().mean() < 0.05 * a.std()
    else:  # L4Q and LSQ: the deployable model is the training forward, bit for bit
        assert torch.equal(a, b)
    code, ev, _ = in_process(capsys, "eval", run / "export", "--json", "--blocks", 16)
    assert code == 0 and "perplexity" in ev and "embedded:pydoc-topics" in ev
    code, _, err = in_process(capsys, "export", run, "--blocks", 16)
    assert code == 2 and "already exists" in err


def test_l4q_keeps_the_precision_recipe_through_export(
    data_cache, pretrained_base, tmp_path, capsys
):
    """precision.recipe fp8-current reaches the L4Q layers' GEMMs (it was dropped: FP32) and
    the export keeps it: the exported logits are the trained model's bit for bit."""
    from lptrain.export import restore
    from lptrain.lora import L4QLinear

    run = tmp_path / "l4q-fp8"
    finetune("l4q-4bit", run, pretrained_base, data_cache, "precision.recipe=fp8-current")
    trained = restore.open_run(run)
    recipes = {m.recipe_layer.recipe.name for m in trained.model.modules()
               if isinstance(m, L4QLinear)}  # fmt: skip
    assert recipes == {"fp8-current"}
    code, out, _ = in_process(capsys, "export", run, "--blocks", 16)
    assert code == 0, out
    exported = restore.open_export(run / "export")
    tokens = torch.randint(1, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained.model.logits(tokens), exported.model.logits(tokens))


def test_hugging_face_llama_fine_tunes_and_exports_back(work, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    hf_dir = tiny_llama(tmp_path / "hf-llama")
    run = tmp_path / "run"
    finetune("l4q-4bit", run, hf_dir, work["cache"], "data.tokenizer=byte")  # it ships none
    assert len(train_losses(run)) == STEPS
    assert (
        in_process(
            capsys, "export", run, "--format", "hf", "--out", tmp_path / "out", "--blocks", 8
        )[0]
        == 0
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), local_files_only=True
    )
    from lptrain.export import fold, restore

    tokens = torch.randint(1, 257, (2, 33), generator=torch.Generator().manual_seed(1))
    trained = restore.open_run(run).model
    fold(trained)  # the deployable layers (l4q: its training forward; nf4: W + BA re-quantized)
    with torch.no_grad():
        ref = trained.model(input_ids=tokens).logits
        got = back(input_ids=tokens).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # same weights, other GEMMs


def test_bad_input_is_one_line_and_writes_nothing(work, tmp_path, capsys):
    run = tmp_path / "existing"  # an earlier start that saved nothing yet
    run.mkdir()
    (run / "config.yaml").write_text("sentinel\n")
    (run / "run.json").write_text('{"wandb_run_id": "abc"}\n')
    base, cache = work["base"], work["cache"]
    recipe = FINETUNE / "l4q-4bit.yaml"
    parse_time = [  # caught when the recipe is read: in this process
        (["init.from=" + str(tmp_path / "nope")], "init.from: no such run directory"),
        (["adapters.bits=9"], "adapters.bits: must be in 2..8, got 9"),
        (["qat.method=lsq"], "adapters.type: l4q with qat.method lsq is not supported"),
        (["adapters.alpha=0"], "adapters.alpha: must be > 0, got 0.0: "),  # a no-op fine-tune
        (["adapters.alpha=-32"], "adapters.alpha: must be > 0, got -32.0: "),
    ]
    for overrides, message in parse_time:
        argv = ["train", recipe, "--run-dir", run, *sets(f"init.from={base}", *overrides)]
        code, _, err = in_process(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and message in err, err
    # Caught while the model is built and converted: a real run (DeepSpeed's process group
    # is up), and the existing run directory stays as it was.
    proc = finetune("l4q-4bit", run, base, cache, "adapters.group_size=48", check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines == [
        "error: adapters.group_size: 48 does not divide in_features 64 (layer layers.0.attn.wq)"
    ]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "lptrain.lock", "run.json"]
    assert (run / "config.yaml").read_text() == "sentinel\n"


def test_base_of_other_shapes_is_refused(work):
    from lptrain.config import schema
    from lptrain.config.schema import ConfigError
    from lptrain.models import converters
    from lptrain.models.decoder import build_model

    cfg = schema.parse({"run": {"max_steps": 1}, "init": {"from": str(work["base"])}})
    (init,) = converters.build(cfg)
    tiny = build_model(cfg.model, 257, 64)  # preset tiny; the base is nano
    ctx = converters.ConvertContext(0, 0, 1, print)
    with pytest.raises(ConfigError, match=r"^init.from: embed.weight: the base has shape"):
        init.convert(tiny, ctx)


def test_logged_val_loss_is_lptrain_evals(work, tmp_path, capsys):
    """A validation split smaller than run.eval_batches x micro_batch (14 blocks < 3 x 8): each
    block counts once (it used to wrap), said once, and the training log's val_loss is
    `lptrain eval`'s on the checkpoint, to the last bit (both read from JSON)."""
    import json

    from tests.helpers import metrics

    run = tmp_path / "run"
    proc = finetune("lora-bf16base", run, work["base"], work["cache"], "data.val_fraction=0.002",
                    "run.eval_batches=3", "run.eval_interval=2", "run.max_steps=2")  # fmt: skip
    warnings = [ln for ln in proc.stderr.splitlines() if "warning: run.eval_batches" in ln]
    assert warnings == [
        "warning: run.eval_batches: 3 x 8 blocks = 24 exceed the 14 validation blocks: "
        "each evaluation reads those 14 once"
    ]
    (logged,) = [row["val_loss"] for row in metrics(run) if "val_loss" in row]
    code, out, _ = in_process(capsys, "eval", run, "--json")
    result = json.loads(out.splitlines()[-1])
    assert code == 0 and result["blocks"] == 14
    assert result["loss"] == logged


def test_more_bad_input_is_one_line(work, tmp_path, capsys):
    """eval --data of a missing file, an adapter rank beyond the layers (it ran out of memory),
    named by their key; export of a run without adapter/QAT layers says that nothing folded."""
    from lptrain.config import schema
    from lptrain.models import converters
    from lptrain.models.decoder import build_model

    missing = tmp_path / "nonexistent.txt"
    code, _, err = in_process(capsys, "eval", work["base"], "--data", missing)
    assert (code, err) == (2, f"error: --data: no such file or directory: {missing}\n")

    raw = {"run": {"max_steps": 1}, "model": {"preset": "nano"},
           "init": {"from": str(work["base"])},
           "adapters": {"type": "lora", "r": 10**9}}  # fmt: skip
    cfg = schema.parse(raw)
    (adapters,) = converters.build(cfg, ("adapters",))
    model = build_model(cfg.model, 257, 64)
    with pytest.raises(ConfigError, match=r"^adapters.r: 1000000000 exceeds min\(in_features, "):
        adapters.convert(model, converters.ConvertContext(0, 0, 1, print))

    out_dir = tmp_path / "export"
    code, out, _ = in_process(capsys, "export", work["base"], "--out", out_dir, "--blocks", 2)
    assert code == 0 and "folded 0 layers: the run has no adapter, QAT or bit-switching" in out
