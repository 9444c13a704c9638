"""What a run starts from (checkpoint/resume.py): the config-change rules, the refusals that keep an
earlier run's checkpoints, and an allowed precision switch on resume end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lptrain.checkpoint import resume
from lptrain.config import schema
from lptrain.config.schema import ConfigError, to_yaml
from lptrain.distributed import engine
from lptrain.testing import checkpoints as fake
from tests.helpers import metrics


def _cfg(**sections) -> schema.TrainConfig:
    raw = {"run": {"max_steps": 10}}
    for path, value in sections.items():
        schema.apply_override(raw, f"{path.replace('__', '.')}={value}")
    return schema.parse(raw)


# ---------------------------------------------------------------- the rules


def test_every_config_key_has_a_rule():
    # A new config section must say what a change on resume means (add rules to RULES).
    uncovered = [k for k in resume.config_keys() if resume.rule_for(k) is resume._UNCOVERED]
    assert uncovered == []


@pytest.mark.parametrize(
    "key,change",
    [
        ("run.max_steps", "free"),
        ("run.max_tokens", "free"),
        ("run.eval_interval", "free"),
        ("logging.interval", "free"),
        ("logging.wandb.mode", "free"),
        ("checkpoint.interval", "free"),
        ("model.checkpointing", "free"),
        ("precision.recipe", "flag"),
        ("precision.saved_activations", "flag"),
        ("optim.lr", "flag"),
        ("optim.states", "never"),
        ("optim.master", "never"),
        ("data.path", "flag"),
        ("model.dim", "never"),
        ("model.n_layers", "never"),
        ("data.block_size", "never"),
        ("deepspeed.micro_batch", "never"),
        ("deepspeed.grad_accum", "never"),
        ("deepspeed.zero_stage", "never"),
        ("deepspeed.dtype", "never"),
        ("run.seed", "never"),
    ],
)
def test_rule_classes(key, change):
    assert resume.rule_for(key).change == change


def test_diff_and_one_line_errors():
    old = yaml.safe_load(to_yaml(_cfg()))
    new = _cfg(precision__recipe="nvfp4", run__max_steps=20, deepspeed__micro_batch=4)
    changes = resume.diff(old, new)
    assert [c.text() for c in changes] == [
        "precision.recipe 'fp32' -> 'nvfp4'",
        "deepspeed.micro_batch 8 -> 4",
        "run.max_steps 10 -> 20",
    ]
    with pytest.raises(ConfigError) as exc:  # NEVER first, whatever is allowed
        resume.check_changes(changes, ["*"], "step00000004")
    assert exc.value.path == "deepspeed.micro_batch"
    assert str(exc.value).startswith(
        "deepspeed.micro_batch: changed since checkpoint step00000004 (8 -> 4); a resume cannot "
        "change it (the batch layout and engine dtype are in the saved state); start a new run"
    )
    flag = [c for c in changes if c.key != "deepspeed.micro_batch"]
    with pytest.raises(ConfigError) as exc:
        resume.check_changes(flag, [], "step00000004")
    assert "add --allow-change precision.recipe (quantizer state is reset)" in str(exc.value)
    resume.check_changes(flag, ["precision.*"], "step00000004")  # allowed by a glob
    with pytest.raises(ConfigError, match="--allow-change: 'precision.recipes' matches no"):
        resume.check_allow(["precision.recipes"])


# ---------------------------------------------------------------- the plan


def _run_dir(tmp_path, steps=(2, 4), cfg=None):
    run = tmp_path / "run"
    for s in steps:
        fake.save(run / "checkpoints", s, to_yaml(cfg or _cfg()))
    return run


def test_plan_resumes_the_newest_and_reports_free_changes(tmp_path):
    assert resume.plan(_cfg(), tmp_path / "new", 1, [], False).source is None
    run = _run_dir(tmp_path)
    p = resume.plan(_cfg(run__max_steps=20), run, 1, [], False)
    assert p.source.tag == "step00000004" and p.step == 4 and not p.reset_quantizers
    assert p.notes == ("config: changed since step00000004: run.max_steps 10 -> 20",)
    p = resume.plan(_cfg(precision__recipe="nvfp4"), run, 1, ["precision.recipe"], False)
    assert p.reset_quantizers and "quantizer state is reset" in p.notes[0]
    # Another world size: a universal-checkpoint resume (checkpoint/elastic.py), whose batch layout
    # may change; the same layout change on the same world size is refused.
    p = resume.plan(_cfg(deepspeed__micro_batch=4), run, 2, [], False)
    assert p.universal and "saved by 1 ranks, this run has 2: resuming through" in p.notes[0]
    assert p.notes[1] == "config: batch layout changed: deepspeed.micro_batch 8 -> 4"
    with pytest.raises(ConfigError, match="deepspeed.micro_batch"):
        resume.plan(_cfg(deepspeed__micro_batch=4), run, 1, [], False)


def test_plan_never_overwrites_an_earlier_runs_checkpoints(tmp_path):
    run = _run_dir(tmp_path)
    with pytest.raises(ConfigError) as exc:
        resume.plan(_cfg(checkpoint__resume="none"), run, 1, [], False)
    assert exc.value.path == "checkpoint.resume" and "--archive" in str(exc.value)
    assert "another --run-dir" in str(exc.value)
    assert resume.plan(_cfg(checkpoint__resume="none"), run, 1, [], True).archive_all
    # Back to an older checkpoint of this run: the newer ones would be overwritten.
    older = str(run / "checkpoints" / "step00000002")
    with pytest.raises(ConfigError, match="step00000002 is older than step00000004"):
        resume.plan(_cfg(checkpoint__resume=older), run, 1, [], False)
    p = resume.plan(_cfg(checkpoint__resume=older), run, 1, [], True)
    assert p.source.step == 2 and p.archive_newer == ("step00000004",)
    # Another run's checkpoint into a run dir that has its own: continue them or archive.
    other = _run_dir(tmp_path / "other")
    ext = _cfg(checkpoint__resume=str(other / "checkpoints"))
    with pytest.raises(ConfigError, match="to continue them set checkpoint.resume=auto"):
        resume.plan(ext, run, 1, [], False)
    assert resume.plan(ext, run, 1, [], True).archive_all
    # A named tag that does not verify is an error, not a silent fallback.
    (other / "checkpoints" / "step00000004" / "manifest.json").unlink()
    bad = _cfg(checkpoint__resume=str(other / "checkpoints" / "step00000004"))
    with pytest.raises(ConfigError, match="step00000004 does not verify: no manifest.json"):
        resume.plan(bad, tmp_path / "fresh", 1, [], False)


def test_a_foreign_newest_checkpoint_names_the_older_one_that_resumes(tmp_path):
    # step 6 was saved by another config (another seed) into this run's directory.
    run = _run_dir(tmp_path)
    ckpt = run / "checkpoints"
    fake.save(ckpt, 6, to_yaml(_cfg(run__seed=1)))
    with pytest.raises(ConfigError) as exc:
        resume.plan(_cfg(), run, 1, [], False)
    msg = str(exc.value)
    assert msg.startswith("run.seed: changed since checkpoint step00000006 (1 -> 0); a resume")
    assert "\n" not in msg
    assert f"step00000006 is the newest checkpoint in {ckpt}" in msg
    assert "step00000004 there verifies and resumes with this config" in msg
    how = f"--set checkpoint.resume={ckpt / 'step00000004'} --archive"
    assert how in msg and f"{run / 'archive'}/<date-time>/" in msg
    # What it says works: back to step 4, step 6 moved aside.
    p = resume.plan(_cfg(checkpoint__resume=str(ckpt / "step00000004")), run, 1, [], True)
    assert p.source.tag == "step00000004" and p.archive_newer == ("step00000006",)
    # An older checkpoint that matches but does not verify is not offered; nor is one whose
    # config differs too.
    (ckpt / "step00000004" / fake.OPTIM).write_bytes(b"cut short")
    with pytest.raises(ConfigError) as exc:
        resume.plan(_cfg(), run, 1, [], False)
    assert "step00000002 there verifies" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        resume.plan(_cfg(run__seed=2), run, 1, [], False)
    assert "there verifies" not in str(exc.value) and "--archive" not in str(exc.value)


# ---------------------------------------------------------------- end to end


def _snapshot(run_dir) -> dict:
    return {
        p.relative_to(run_dir).as_posix(): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        # every start rewrites the lock file with its pid (test_lock.py)
        if p.is_file() and "logs" not in p.parts and p.name != "lptrain.lock"
    }


def test_resume_refuses_changes_keeps_the_run_dir_and_allows_a_recipe_switch(cli, tmp_path):
    run_dir = tmp_path / "run"
    common = ["run.max_steps=6", "checkpoint.interval=2"]
    cli("tiny-fp8.yaml", *common, "run.stop_at_step=4", run_dir=run_dir)
    before = _snapshot(run_dir)
    refused = {
        "precision.recipe=nvfp4": "error: precision.recipe: changed since checkpoint "
        "step00000004 ('fp8-delayed' -> 'nvfp4'); to change it on resume add --allow-change "
        "precision.recipe (quantizer state is reset), or start",
        "deepspeed.zero_stage=1": "error: deepspeed.zero_stage: changed since checkpoint "
        "step00000004 (0 -> 1); a resume cannot change it",
    }
    for override, expected in refused.items():
        proc = cli("tiny-fp8.yaml", *common, override, run_dir=run_dir, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(expected), proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1 and proc.stdout == ""
        assert _snapshot(run_dir) == before  # schema.yaml, checkpoints, metrics untouched

    # Deliberate: fp8-delayed -> nvfp4 and a lower lr from step 4 on.
    switch = ["precision.recipe=nvfp4", "optim.lr=2e-3"]
    flags = ["--allow-change", "precision.recipe", "--allow-change", "optim.*"]
    proc = cli("tiny-fp8.yaml", *common, *switch, run_dir=run_dir, flags=flags)
    assert "precision.recipe 'fp8-delayed' -> 'nvfp4' (quantizer state is reset)" in proc.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["precision"]["recipe"] == "nvfp4"
    saved = torch.load(run_dir / "checkpoints" / "step00000006" / fake.MODEL, weights_only=False)
    module = saved["module"]
    # Reset: each layer's call counter restarted at the switch (2 steps since), and nvfp4's
    # state replaced fp8-delayed's amax histories.
    assert int(module["layers.0.attn.wq.step"]) == 2
    assert not any("quant_state" in k for k in module)
    # Kept: Adam's step count and moments, the schedule position, the data position.
    assert saved["optimizer"]["state"][0]["step"] == 6 and saved["lr_scheduler"]["last_epoch"] == 6
    assert saved["lptrain"]["sample_index"] == 6 * 8 and saved["global_steps"] == 6
    # The new lr governs from the first resumed step on the same schedule.
    rows = {r["step"]: r for r in metrics(run_dir) if "loss" in r}
    factor = engine.lr_lambda(schema.load(run_dir / "config.yaml"), 6)
    assert sorted(rows) == list(range(1, 7)) and rows[4]["lr"] == pytest.approx(1e-2 * factor(4))
    assert [rows[s]["lr"] for s in (5, 6)] == pytest.approx([2e-3 * factor(s) for s in (5, 6)])

    # A fresh start over it only with --archive, which moves the earlier run aside whole.
    fresh = ["run.max_steps=2", "checkpoint.resume=none"]
    before = _snapshot(run_dir)
    proc = cli("tiny-fp32.yaml", *fresh, run_dir=run_dir, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: checkpoint.resume: none, but")
    assert "add --archive (moves them to" in proc.stderr and "another --run-dir" in proc.stderr
    assert proc.stderr.count("\n") == 1 and _snapshot(run_dir) == before
    cli("tiny-fp32.yaml", *fresh, run_dir=run_dir, flags=["--archive"])
    (archived,) = (run_dir / "archive").iterdir()
    assert sorted(p.name for p in (archived / "checkpoints").iterdir()) == [
        "latest",
        "step00000004",
        "step00000006",
    ]
    assert len([r for r in metrics(archived) if "loss" in r]) == 6
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == [1, 2]
    assert json.loads((run_dir / "run.json").read_text()) != json.loads(
        (archived / "run.json").read_text()
    )


def test_a_checkpoint_saved_before_a_key_existed_resumes_at_its_default():
    old = yaml.safe_load(to_yaml(_cfg(precision__recipe="nvfp4")))
    del old["precision"]["overrides"]  # a run from before precision.overrides
    assert resume.diff(old, _cfg(precision__recipe="nvfp4")) == []
    new = _cfg(precision__recipe="nvfp4", precision__overrides=[{"recipe": "bf16"}])
    (change,) = resume.diff(old, new)  # setting it now is a precision change
    assert (change.key, change.rule.effect) == ("precision.overrides", "reset_quantizers")


def test_saved_activations_change_asks_for_the_flag_but_keeps_quantizer_state():
    old = yaml.safe_load(to_yaml(_cfg(precision__recipe="fp8-delayed")))
    del old["precision"]["saved_activations"]  # a run from before the option
    assert resume.diff(old, _cfg(precision__recipe="fp8-delayed")) == []
    new = _cfg(precision__recipe="fp8-delayed", precision__saved_activations="fp8")
    (change,) = resume.diff(old, new)
    assert (change.key, change.rule.change, change.rule.effect) == (
        "precision.saved_activations",
        "flag",
        "",
    )


def test_a_fine_tune_saved_before_data_tokenizer_could_be_unset_resumes(tmp_path):
    # Its config.yaml recorded the default `byte`, which meant "the base's tokenizer".
    new = _cfg(init__from=str(tmp_path))
    assert new.data.tokenizer is None
    old = yaml.safe_load(to_yaml(new))
    old["data"]["tokenizer"] = "byte"
    assert resume.diff(old, new) == []
    del old["init"]  # a pretraining run's byte was byte: unsetting it is a change
    assert [c.key for c in resume.diff(old, new)] == ["data.tokenizer"]
