"""Elastic resume (checkpoint/elastic.py): a checkpoint saved on N ranks resumes on M ranks
through a DeepSpeed universal checkpoint, converted automatically, with the quantizer state
carried over.

One chain, FP8 (delayed scaling) on ZeRO-3: a 1-rank run of 6 steps (the reference, saving
every 2 steps); its step-2 checkpoint resumed on 2 ranks (to step 6, the same lr schedule);
that run's step-4 checkpoint resumed on 1 rank. Each resumed run is compared with the run
whose checkpoint it loaded, over the same steps. The global batch is the same throughout, so after
each resume only the number of ranks differs and the bounds are those of the two-rank tests
(test_launch.py): the first step after a resume to 1e-5 relative, later steps to 2% (fp32
summation order flips FP8 roundings). The Adam step count and the delayed-scaling history are
checked exactly: DeepSpeed's ZeRO-3 universal loader shares one step tensor over the parameter
groups (each update would count twice), and a universal load skips module buffers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lptrain import safeload
from tests.helpers import free_port, train_losses

REL_TOL = 1e-5
FP8_DRIFT_TOL = 2e-2
HISTORY = "layers.0.attn.wq.quant_state.output_input"
ZERO3 = "deepspeed.extra={zero_optimization: {stage3_param_persistence_threshold: 0}}"
COMMON = ["run.max_steps=6", "checkpoint.interval=2", "checkpoint.keep_last=3",
          "deepspeed.zero_stage=3", ZERO3]  # fmt: skip


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc_per_node", "2", "--master_port", str(free_port())]  # fmt: skip


def _files(run_dir, tag: str, kind: str):
    return torch.load(
        run_dir / "checkpoints" / tag / f"zero_pp_rank_0_mp_rank_00_{kind}_states.pt",
        weights_only=False,
    )


def _close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) == 2, (a, b)  # the two steps after a resume
    for x, y, tol in zip(a, b, [REL_TOL, FP8_DRIFT_TOL], strict=True):
        assert abs(x - y) <= tol * abs(x), (a, b)


@pytest.mark.slow
def test_fp8_zero3_resumes_from_one_rank_on_two_and_back(cli, tmp_path):
    ref = tmp_path / "ref"
    cli("tiny-fp8.yaml", *COMMON, "deepspeed.micro_batch=8", run_dir=ref)
    ref_losses = train_losses(ref)
    two = tmp_path / "two"
    proc = cli("tiny-fp8.yaml", *COMMON, "deepspeed.micro_batch=4",
               "deepspeed.train_batch_size=8", f"checkpoint.resume={ref}/checkpoints/step00000002",
               run_dir=two, launcher=_torchrun(), timeout=300)  # fmt: skip
    assert "saved by 1 ranks, this run has 2: resuming through a DeepSpeed universal" in (
        proc.stderr
    )
    assert (two / "checkpoints" / "universal" / "step00000002" / "zero").is_dir()
    assert not (ref / "checkpoints" / "universal").exists()  # the source run is only read
    _close(ref_losses[2:4], train_losses(two)[:2])
    back = tmp_path / "back"
    cli("tiny-fp8.yaml", *COMMON, "deepspeed.micro_batch=8",
        f"checkpoint.resume={two}/checkpoints/step00000004", run_dir=back)  # fmt: skip
    _close(train_losses(two)[2:], train_losses(back))  # the run it resumed from: 2 ranks
    # Adam took exactly 4 steps on every parameter group by the 2-rank run's step-4 save.
    steps = _files(two, "step00000004", "optim")["optimizer_state_dict"]["optimizer_state_dict"]
    assert [float(s["step"]) for s in steps["state"].values()] == [4.0] * len(steps["state"])
    # The delayed-scaling history went on through both resumes: one amax per forward call.
    want, got = (_files(r, "step00000006", "model")["module"] for r in (ref, back))
    assert int(got[f"{HISTORY}.calls"].sum()) == int(want[f"{HISTORY}.calls"].sum()) == 6
    hist = f"{HISTORY}.amax_history"
    assert int((got[hist] != 0).sum()) == int((want[hist] != 0).sum()) == 6


@pytest.mark.slow
def test_compact_states_resume_from_two_ranks_on_one(cli, tmp_path):
    """int8-block moments on ZeRO-2, 2 ranks -> 1: the first loss after the resume (the saved
    weights) to 1e-5, the next (the first update from the carried moments) too, as for fp32
    (docs/checkpoints.md); the moments keep their saved codes and scales except the blocks the
    old partition boundary cut (optim/reshard.py; tests/optim/test_reshard.py checks the bits)."""
    common = ["optim.states=int8-block", "deepspeed.zero_stage=2", "run.max_steps=4",
              "checkpoint.interval=2"]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    cli("tiny-fp32.yaml", *common, "deepspeed.micro_batch=4", "deepspeed.train_batch_size=8",
        run_dir=two, launcher=_torchrun(), timeout=300)  # fmt: skip
    proc = cli("tiny-fp32.yaml", *common, "deepspeed.micro_batch=8",
               f"checkpoint.resume={two}/checkpoints/step00000002", run_dir=one)  # fmt: skip
    saved = _files(two, "step00000002", "optim")["optimizer_state_dict"]["base_optimizer_state"]
    cut = sum(2 for s in saved["state"].values() if len(s["exp_avg_codes"]) % 128)
    assert f"int8-block optimizer states carried over bit for bit, except {cut} block(s)" in (
        proc.stderr
    )
    a, b = train_losses(two)[2:], train_losses(one)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= REL_TOL * abs(x), (a, b)


def test_stage0_checkpoint_on_another_world_size_is_refused(tmp_path):
    from lptrain.checkpoint import elastic
    from lptrain.checkpoint.store import Found
    from lptrain.config.schema import ConfigError

    own = tmp_path / "new" / "checkpoints"
    found = Found(tmp_path, "step00000002", {"world_size": 1, "zero_stage": 0})
    with pytest.raises(ConfigError, match="universal checkpoint needs ZeRO stage 1-3"):
        elastic.check(found, 2, own)
    found = Found(tmp_path, "step00000002", {"world_size": 1, "zero_stage": 1})
    assert f"converting it once into {own}/universal/step00000002" in elastic.check(found, 2, own)
    assert "resuming through a DeepSpeed universal" in elastic.check(found, 2, own, "fp8")
    zero3 = Found(tmp_path, "step00000002", {"world_size": 1, "zero_stage": 3})
    with pytest.raises(ConfigError, match="^optim.states: .*ZeRO stage 3 .* no form independent"):
        elastic.check(zero3, 2, own, "fp8")
    assert elastic.command(found, own) == (
        f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {tmp_path}/step00000002 "
        f"--output_folder {own}/universal/step00000002"
    )


def test_the_universal_copy_is_written_in_the_resuming_run_never_in_the_source(
    tmp_path, monkeypatch
):
    from lptrain.checkpoint import elastic
    from lptrain.checkpoint.store import Found

    converted = []

    def ds_to_universal(cmd, **kw):  # DeepSpeed's converter, writing what it would: folders
        out = Path(cmd[cmd.index("--output_folder") + 1])
        (out / "zero").mkdir(parents=True)
        (out / "latest_universal").write_text("step00000002")
        converted.append(cmd[cmd.index("--input_folder") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(elastic.subprocess, "run", ds_to_universal)
    meta = {"world_size": 1, "zero_stage": 2, "tag": "step00000002"}
    src, other = (tmp_path / r / "checkpoints" for r in ("src", "other"))
    for d in (src, other):
        (d / "step00000002").mkdir(parents=True)
    own = tmp_path / "new" / "checkpoints"
    said = []
    path = elastic.ensure_universal(Found(src, "step00000002", meta), own, said.append)
    assert path == own / "universal" / "step00000002" and (path / "zero").is_dir()
    assert [p.name for p in src.iterdir()] == ["step00000002"]  # nothing written in the source
    assert elastic.ensure_universal(Found(src, "step00000002", meta), own, said.append) == path
    assert converted == [str(src / "step00000002")]  # made once
    # the same tag of another run is not mistaken for it: converted again
    elastic.ensure_universal(Found(other, "step00000002", meta), own, said.append)
    assert converted[-1] == str(other / "step00000002")
    assert f"made from {src.resolve()}/step00000002" in said[-2], said


@pytest.mark.parametrize("marked", [False, True], ids=["before-507c4ec", "group-aligned"])
def test_old_ranks_files_are_read_in_the_blocks_they_were_saved_in(tmp_path, marked):
    """2 old ranks over a 1000-element buffer, rank 1's slice from 500 = 3 x 128 + 116. Files
    saved before group-aligned blocks (no mark) are decoded in their own blocks, for the
    converter and for the cut (re-encoded once, counted); marked ones are kept bit for bit."""
    from lptrain.checkpoint import elastic
    from lptrain.checkpoint.store import Found
    from lptrain.optim import STATE_FORMATS, reshard
    from lptrain.optim import states as st

    fmt, length = STATE_FORMATS["int8-block"], 500
    found = Found(tmp_path / "src", "step00000002", {"world_size": 2, "zero_stage": 2})
    found.path.mkdir(parents=True)
    x = torch.logspace(-6, -2, 2 * length)
    parts = []
    for r in range(2):
        saved_at = r * length if marked else 0
        part = {"step": torch.tensor(2.0)}
        for name, codec in (("exp_avg", fmt.m), ("exp_avg_sq", fmt.v)):
            codes_scales = st.encode(x[r * length : (r + 1) * length], codec, saved_at)
            part[f"{name}_codes"], part[f"{name}_scales"] = codes_scales
        group = {"lr": 1e-3, "params": [0]}
        if marked:
            group[reshard.LAYOUT] = reshard.GROUP_ALIGNED
        base = {"state": {0: part}, "param_groups": [group]}
        torch.save({"optimizer_state_dict": {"base_optimizer_state": base}},
                   found.path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")  # fmt: skip
        parts.append((part, saved_at))
    olds, changed = elastic._group_aligned(found, fmt)
    copy = elastic._decoded_copy(found, tmp_path / "own" / "universal" / found.tag, fmt.name)
    decoded = safeload.load(copy / "zero_pp_rank_1_mp_rank_00_optim_states.pt", "t")
    (part, saved_at) = parts[1]
    old = st.decode(part["exp_avg_codes"], part["exp_avg_scales"], fmt.m, start=saved_at)
    got = decoded["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["exp_avg"]
    assert torch.equal(got, old)  # what the converter reads: the moment as it was saved
    want = st.encode(old, fmt.m, length)  # the old decode, in the buffer's blocks
    assert torch.equal(olds[1][0]["exp_avg_codes"], want[0])
    assert torch.equal(olds[1][0]["exp_avg_scales"], want[1])
    for key, value in parts[0][0].items():  # rank 0's slice starts at 0: blocks coincide
        assert torch.equal(olds[0][0][key], value), key
    assert (changed is None) == marked and (marked or changed > 0)


def test_a_failed_conversion_of_compact_states_names_the_copy_the_converter_can_read(
    tmp_path, monkeypatch
):
    from lptrain.checkpoint import elastic
    from lptrain.checkpoint.store import Found
    from lptrain.errors import ConfigError

    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback\nKeyError: 'exp_avg'")

    monkeypatch.setattr(elastic.subprocess, "run", failing)
    found = Found(tmp_path / "src", "step00000002", {"world_size": 2, "zero_stage": 2})
    found.path.mkdir(parents=True)
    own = tmp_path / "new" / "checkpoints"
    with pytest.raises(ConfigError) as fp32:
        elastic.ensure_universal(found, own, print)
    assert f"--input_folder {found.path} --output_folder" in str(fp32.value)
    with pytest.raises(ConfigError) as fp8:
        elastic.ensure_universal(found, own, print, "fp8")
    copy = own / "universal" / "step00000002.input"  # not the source: its moments are codes
    assert f"(KeyError: 'exp_avg'); run: python -m deepspeed.checkpoint.ds_to_universal " \
        f"--input_folder {copy} --output_folder {own}/universal/step00000002 (its input is " \
        f"{found.path} with the fp8 moments decoded to fp32" in str(fp8.value)  # fmt: skip
    assert copy.is_dir()  # kept for that command
