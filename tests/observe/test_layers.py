"""Per-layer statistics reduced over ranks and micro-batches (observe/layers.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lptrain.nn import stats_window
from lptrain.numerics import QuantSpec, fake_quantize
from lptrain.numerics.stats import merge_stats
from lptrain.observe.layers import quant_metrics, reduce_over_ranks
from lptrain.testing.runs import free_port

SPEC = QuantSpec("fp4_e2m1", scaling="block", block_size=32, scale_format="e8m0")


def _local(rank: int) -> dict:
    """Rank r's statistics: different magnitudes per rank, and an entry only rank 1 has."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank)) * (1 + 9 * rank)
    stats = {"a": {"output.input": fake_quantize(x, SPEC, with_stats=True)[1]["stats"].as_dict()}}
    stats["a"]["output.accumulator"] = {"int32_overflows": float(rank), "chunk_sums": 4.0}
    if rank == 1:
        stats["b"] = {"output.weight": stats["a"]["output.input"]}
    return stats


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        got = reduce_over_ranks(_local(rank))
    finally:
        dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(got, f)


def test_two_ranks_reduce_to_the_merge_of_everything(tmp_path):
    out = str(tmp_path / "reduced")
    mp.start_processes(_worker, args=(free_port(), out), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads(open(f"{out}.{r}").read()) for r in (0, 1))
    assert r0 == r1  # every rank decides on the same numbers
    want = merge_stats(_local(0)["a"]["output.input"], _local(1)["a"]["output.input"])
    assert r0["a"]["output.input"] == pytest.approx(want, rel=1e-9)
    assert r0["a"]["output.accumulator"] == {"int32_overflows": 1.0, "chunk_sums": 8.0}
    assert r0["b"]["output.weight"] == pytest.approx(_local(1)["b"]["output.weight"], rel=1e-9)


def test_metric_names():
    from lptrain.nn import Linear

    layer = Linear(64, 64, recipe="nvfp4")
    stats = {"l": {"output.input": _local(0)["a"]["output.input"]}}
    stats["l"]["output.accumulator"] = {"int32_overflows": 3.0, "chunk_sums": 9.0}
    names = quant_metrics(stats, ["amax", "scale", "sqnr_db"], {"l": layer})
    assert set(names) == {
        "quant/l/output.input/amax",
        "quant/l/output.input/scale_min",  # block scales: their range
        "quant/l/output.input/scale_max",
        "quant/l/output.input/sqnr_db",
        "quant/l/output.accumulator/int32_overflows",
    }
    per_tensor = quant_metrics(stats, ["scale"], {"l": Linear(64, 64, recipe="fp8-current")})
    assert "quant/l/output.input/scale" in per_tensor


def _rows(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "layers.jsonl").open())}


@pytest.mark.slow
def test_two_ranks_with_accumulation_match_one_process(monitored_runs):
    """1 process x 16 sequences against 2 ranks x 2 micro-batches x 4 sequences under ZeRO-2,
    the same global batch. MXFP8 blocks are per token row/column, so every block is the same
    in both: statistics of the forward operands agree to float rounding, gradient operands too
    except for magnitudes (the per-rank loss is a mean over 4 sequences, then halved by
    gradient accumulation: dY is exactly 2x, and E8M0 scaling is exact under powers of two),
    and per-layer gradient norms (of the rank-averaged gradient) agree to 1e-5."""
    one, two = _rows(monitored_runs["monitored"])[1], _rows(monitored_runs["two_ranks"])[1]
    assert set(one) == set(two)
    checked = 0
    for key, a in one.items():
        b = two[key]
        if key == "step" or "/cosine" in key or "/alignment" in key:
            continue  # the probe batch is rank 0's first micro-batch: 16 vs 4 sequences
        if "grad_output" in key and key.rsplit("/", 1)[1] in ("amax", "scale_min", "scale_max"):
            assert b == pytest.approx(2 * a, rel=1e-6), key
        else:
            assert b == pytest.approx(a, rel=1e-5, abs=1e-9), key
        checked += 1
    assert checked > 500


def test_the_key_count_said_at_start_is_the_rows_key_count(monitored_runs):
    """mxfp8, all default statistics, fidelity on: the count printed before training equals
    the keys of the first layers.jsonl row (and so of W&B, which gets the same row)."""
    run_dir = monitored_runs["monitored"]
    (line,) = [x for x in monitored_runs.stderr["monitored"].splitlines() if "keys per row" in x]
    row = json.loads((run_dir / "layers.jsonl").read_text().splitlines()[0])
    assert line == f"monitor: {len(row) - 1} per-layer keys per row (layers.jsonl, W&B), 15 layers"


def test_keys_per_layer_follows_the_recipes_operands():
    """fp8-delayed scales per tensor, so the backward reuses the forward's copies: 3 operands
    (input, weight, grad_output) x 7 statistics. int16-dfp requantizes all 6 operands and
    counts INT32 overflows in each of its 3 GEMMs' accumulators."""
    from lptrain.config.precision import resolve_recipe
    from lptrain.config.schema import STATS, PrecisionConfig
    from lptrain.observe.layers import keys_per_layer

    def keys(recipe: str) -> int:
        return keys_per_layer(resolve_recipe(PrecisionConfig(recipe=recipe)), list(STATS))

    assert keys("fp8-delayed") == 3 * 7
    assert keys("int16-dfp") == 6 * 7 + 3


@pytest.mark.parametrize(
    "recipe, shadow, monitor, error",
    [
        ("nvfp4", ["mxfp9"], {}, r"unknown recipe 'mxfp9' \(known: fp32, "),
        ("nvfp4", ["nvfp4"], {}, r"'nvfp4' is the run's own recipe"),
        ("nvfp4", ["mxfp8", "mxfp8"], {}, r"'mxfp8' is listed twice"),
        ("nvfp4", ["int16-dfp"], {}, r"'int16-dfp' cannot be a shadow: it accumulates in INT32"),
        ("nvfp4", ["bf16"], {}, r"'bf16' cannot be a shadow: it quantizes nothing"),
        ("fp32", ["mxfp8"], {}, r"precision\.recipe fp32 converts no layer"),
        ("nvfp4", ["mxfp8"], {"interval": 0}, r"needs per-layer statistics"),
    ],
)
def test_shadow_config_errors_name_the_key(recipe, shadow, monitor, error):
    from lptrain.config.schema import ConfigError, parse
    from lptrain.observe import check

    raw = {"run": {"max_steps": 2}, "precision": {"recipe": recipe}}
    cfg = parse({**raw, "monitor": {"shadow": shadow, **monitor}})
    with pytest.raises(ConfigError, match=rf"^monitor\.shadow: {error}"):
        check(cfg)


def test_shadow_keys_and_their_count():
    """A shadow's keys are named `shadow/<recipe>/...`, one per live key of a layer of that
    recipe, and the key count at start counts them."""
    from lptrain.config.schema import MonitorConfig
    from lptrain.nn import Linear
    from lptrain.observe.layers import key_count, keys_per_layer, shadow_metrics, split_shadows
    from lptrain.recipes import get

    layer = Linear(64, 64, bias=False, recipe="fp8-current", backend="emulated", seed=0)
    x = torch.randn(4, 64, requires_grad=True)
    with stats_window({"l": layer}, {"l": (get("nvfp4"),)}) as stats:
        layer(x).sum().backward()
    live, shadows = split_shadows(stats)
    wanted = ["amax", "scale", "sqnr_db"]
    keys = set(shadow_metrics(shadows, wanted, {"l": layer}, {"nvfp4": get("nvfp4")}))
    assert "shadow/nvfp4/l/output.input/scale_min" in keys  # NVFP4 scales per block
    assert "shadow/nvfp4/l/output.input/scale" not in keys
    # Five operands (grad_input reuses the 16x16-tiled weight) x (amax, 2 scales, sqnr): as
    # many as an nvfp4 layer's own quant/ keys
    assert len(keys) == 5 * 4 == keys_per_layer(get("nvfp4"), wanted)
    assert len(quant_metrics(live, wanted, {"l": layer})) == 3 * 3  # fp8: 3 operands reused
    cfg = MonitorConfig(stats=wanted, grad_norm=False, update_ratio=False)
    assert key_count({"l": layer}, {}, cfg, (get("nvfp4"),)) == 9 + 20


def test_blocks_of_layer_names_and_non_finite_values():
    import math

    from lptrain.observe.layers import aggregate_blocks, block_of
    from lptrain.observe.metrics import panel_key

    assert block_of("layers.3.attn.wq") == "layers.3" and block_of("lm_head") == "lm_head"
    assert block_of("model.layers.12.self_attn.q_proj.recipe_layer") == "model.layers.12"
    row = {"step": 5, "quant/layers.0.a/output.input/sqnr_db": 20.0,
           "quant/layers.0.b/output.input/sqnr_db": math.nan,  # non-finite stays so
           "quant/layers.1.a/output.input/sqnr_db": math.inf,
           "quant/layers.1.b/output.input/sqnr_db": 12.5}  # fmt: skip
    out = aggregate_blocks(row)
    assert math.isnan(out["quant/layers.0/output.input/sqnr_db"])
    assert out["quant/layers.1/output.input/sqnr_db"] == 12.5 and out["step"] == 5
    assert panel_key("quant/layers.1/output.input/sqnr_db") == "quant.layers.1/output.input/sqnr_db"
