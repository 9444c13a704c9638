"""Typed recipe files (config/schema.py): every shipped recipe parses; types are strict."""

from __future__ import annotations

import pytest

from lptrain.config.init_source import locate
from lptrain.config.schema import ConfigError, TrainConfig, parse
from tests.helpers import RECIPES


def test_required_recipes_exist():
    names = {p.name for p in RECIPES}
    tiny = {f"tiny-{x}.yaml" for x in ("fp32", "bf16", "fp8", "nvfp4", "quartet", "int16-dfp")}
    assert tiny <= names
    assert {n.split("-")[1] for n in names if n.startswith("gpu-")} == {"125m", "1b", "7b"}


def test_defaults_parse_and_types_are_strict():
    cfg = parse({"run": {"max_steps": 1}, "optim": {"lr": "1e-3"}})
    assert isinstance(cfg, TrainConfig) and cfg.optim.lr == 1e-3
    with pytest.raises(ConfigError, match=r"^deepspeed.micro_batch: must be >= 1"):
        parse({"run": {"max_steps": 1}, "deepspeed": {"micro_batch": 0}})


def test_finetune_sections_round_trip_with_the_from_key(tmp_path):
    from lptrain.config.schema import load, to_yaml

    raw = {"run": {"max_steps": 1}, "qat": {"method": "lsq", "act_bits": 8}}
    cfg = parse(raw)
    assert "from: null" in to_yaml(cfg) and "from_" not in to_yaml(cfg)
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load(tmp_path / "c.yaml").qat == cfg.qat  # a run's config.yaml runs again
    with pytest.raises(ConfigError, match=r"^qat.act_bits: must be in 2..8, got 12"):
        parse({"run": {"max_steps": 1}, "qat": {"method": "lsq", "act_bits": 12}})
    with pytest.raises(ConfigError, match=r"^adapters.type: expected 'lora' \| 'l4q' or null"):
        parse({"run": {"max_steps": 1}, "adapters": {"type": "dora"}})
    # A run's saved config parses after its base is gone (checkpoint/base.py); whether the base
    # exists is checked when a run starts from it (lptrain/config/init_source.py locate).
    gone = parse({"run": {"max_steps": 1}, "init": {"from": str(tmp_path / "none")}})
    assert gone.init.from_ == str(tmp_path / "none")
    with pytest.raises(ConfigError, match=r"^init.from: no such run directory"):
        locate(str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"^init.from: .* is not an lptrain run directory"):
        locate(str(tmp_path))


def test_bf16_recipe_needs_the_bf16_dtype():
    # recipe bf16 quantizes nothing; with dtype fp32 it would silently be an fp32 run.
    with pytest.raises(ConfigError, match=r"^precision.recipe: 'bf16' runs in bf16 only with"):
        parse({"run": {"max_steps": 1}, "precision": {"recipe": "bf16"}})
    cfg = parse(
        {"run": {"max_steps": 1}, "precision": {"recipe": "bf16"}, "deepspeed": {"dtype": "bf16"}}
    )
    assert cfg.deepspeed.dtype == "bf16"


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "a\\b", ""])
def test_run_name_stays_one_folder_inside_runs(name):
    # The default run directory is runs/<run.name>-<time>: a name must not leave runs/.
    with pytest.raises(ConfigError, match=r"^run.name: .*one folder name"):
        parse({"run": {"max_steps": 1, "name": name}})


def test_run_name_plain_names_parse():
    assert parse({"run": {"max_steps": 1, "name": "fp8-a..b_2"}}).run.name == "fp8-a..b_2"


def test_bf16_sr_master_weights_need_bf16_and_zero0():
    def cfg(**ds):
        return {"run": {"max_steps": 1}, "optim": {"master": "bf16-sr"}, "deepspeed": ds}

    assert parse(cfg(dtype="bf16")).optim.master == "bf16-sr"
    with pytest.raises(ConfigError, match=r"^optim.master: .*needs deepspeed.dtype bf16"):
        parse(cfg(dtype="fp32"))
    with pytest.raises(ConfigError, match=r"^optim.master: bf16-sr needs deepspeed.zero_stage 0"):
        parse(cfg(dtype="bf16", zero_stage=2))
    with pytest.raises(ConfigError, match=r"^optim.states: expected"):
        parse({"run": {"max_steps": 1}, "optim": {"states": "int4"}})


def test_moment_statistics_of_unquantized_states_are_refused():
    # fp32 states lose nothing when stored: monitor.optim_states would log nothing
    with pytest.raises(ConfigError, match=r"^monitor.optim_states: optim.states fp32 keeps"):
        parse({"run": {"max_steps": 1}, "monitor": {"optim_states": True}})
    cfg = {"run": {"max_steps": 1}, "optim": {"states": "bf16"}, "monitor": {"optim_states": True}}
    assert parse(cfg).monitor.optim_states is True
