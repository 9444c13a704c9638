"""Run logging (observe/metrics.py): W&B offline, disabled, auto without credentials; one training
run is one W&B run across resumes, online and offline."""

from __future__ import annotations

import json
import sys
import types

from lptrain.config.schema import WandbConfig
from lptrain.observe.metrics import _Wandb, panel_key
from lptrain.testing import wandb_file
from tests.helpers import metrics


def test_wandb_auto_without_credentials_goes_offline(cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(
        "tiny-fp32.yaml",
        "run.max_steps=2",
        "logging.wandb.mode=auto",
        run_dir=run_dir,
        env_extra={"HOME": str(tmp_path), "WANDB_SILENT": "true"},
    )
    assert "wandb: no credentials found, logging offline" in proc.stderr
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_wandb_disabled_writes_nothing(cli, tmp_path):
    run_dir = tmp_path / "run"
    cli("tiny-fp32.yaml", "run.max_steps=1", "logging.wandb.mode=disabled", run_dir=run_dir)
    assert not (run_dir / "wandb").exists()


# ---------------------------------------------------------------- one training run, one W&B run


class FakeRun:
    def __init__(self, resumed=False, step=0):
        self.resumed, self.step, self.logged = resumed, step, []

    def log(self, row, step):
        self.logged.append(step)

    def finish(self):
        pass


def _fake_wandb(monkeypatch, run: FakeRun, fail_online: bool = False) -> list[dict]:
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if fail_online and kwargs["mode"] == "online":
            raise RuntimeError("no network")
        return run

    fake = types.SimpleNamespace(init=init, Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return calls


def test_wandb_resumes_the_run_id_online_and_in_the_offline_fallback(monkeypatch, tmp_path):
    run = FakeRun(resumed=True, step=7)  # online, the server holds steps up to 6
    calls = _fake_wandb(monkeypatch, run, fail_online=True)
    w = _Wandb(WandbConfig(mode="online"), tmp_path, {}, lambda msg: None, "abcd1234")
    assert [(c["mode"], c["id"], c["resume"]) for c in calls] == [
        ("online", "abcd1234", "allow"),
        ("offline", "abcd1234", "allow"),
    ]
    for step in (5, 6, 7, 8, 6, 8):  # steps W&B already holds are not sent again
        w.log({"step": step, "loss": 1.0})
    assert run.logged == [7, 8, 8]


def test_wandb_continues_one_run_across_a_stop_a_kill_and_a_resume(cli, tmp_path):
    run_dir = tmp_path / "run"
    common = ["run.max_steps=8", "checkpoint.interval=2", "logging.wandb.mode=offline"]
    env = {"HOME": str(tmp_path), "WANDB_SILENT": "true"}
    cli("tiny-fp32.yaml", *common, "run.stop_at_step=4", run_dir=run_dir, env_extra=env)
    # Killed in the 4th step after resuming (step 8): steps 5-7 logged, checkpoint at 6.
    proc = cli("tiny-fp32.yaml", *common, run_dir=run_dir, env_extra=env, faults="kill@4",
               check=False)  # fmt: skip
    assert proc.returncode == -9
    cli("tiny-fp32.yaml", *common, run_dir=run_dir, env_extra=env)
    rows = [r for r in metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))  # one row per step
    superseded = (run_dir / "metrics-superseded.jsonl").read_text().splitlines()
    (old,) = [json.loads(line) for line in superseded]
    assert (old["step"], old["superseded_at"]) == (7, 6)
    assert old["loss"] == rows[6]["loss"]  # the redone step 7 is the same, bit for bit
    run_id = json.loads((run_dir / "run.json").read_text())["wandb_run_id"]
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 3 and all(f.name == f"run-{run_id}.wandb" for f in files)
    # Training rows only (a resume also logs its event, at the step resumed from).
    first, killed, last = (
        [r["_step"] for r in wandb_file.history(f) if "loss" in r] for f in files
    )
    assert first == [1, 2, 3, 4] and last == [7, 8] and set(killed) <= {5, 6, 7}
    assert wandb_file.run_id(files[0]) == wandb_file.run_id(files[2]) == run_id


def test_offline_wandb_holds_the_layer_metrics_and_the_config(monitored_runs):
    """Read back with wandb's own record definitions: every per-layer metric of layers.jsonl
    and every step metric of metrics.jsonl is in the W&B history at its step, and the run's
    config is the resolved recipe."""
    import json

    from lptrain.testing.wandb_file import read_wandb_file

    run_dir = monitored_runs["monitored"]
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    wb = read_wandb_file(path)
    by_step: dict[int, dict] = {}
    for row in wb.history:
        by_step.setdefault(row["_step"], {}).update(row)
    files = [run_dir / "metrics.jsonl", run_dir / "layers.jsonl"]
    checked = 0
    for row in (json.loads(x) for f in files for x in f.read_text().splitlines()):
        logged = by_step[row["step"]]
        for key, value in row.items():
            if key != "step":
                assert logged[panel_key(key)] == value, key  # null stays null: non-finite
                checked += 1
    assert checked > 4 * 700
    # A W&B panel section per block (the first `/` segment); layers.jsonl keeps the name.
    assert "quant.layers.1/mlp.w2/grad_weight.grad_output/sqnr_db" in by_step[4]
    assert "grad/layers.1.mlp.w2/norm" in by_step[4]
    assert wb.config["precision"]["recipe"] == "mxfp8"
    assert wb.config["precision_resolved"]["name"] == "mxfp8"
    assert wb.config["monitor"]["interval"] == 1 and wb.config["precision"]["guard"]["enabled"]


def test_wandb_disabled_run_dir_still_has_everything(monitored_runs):
    """The two-rank run logs to W&B `disabled`: nothing is written for W&B, and its run
    directory holds the same metrics as the offline run's."""
    import json

    two, one = monitored_runs["two_ranks"], monitored_runs["monitored"]
    assert not (two / "wandb").exists()
    for name in ("metrics.jsonl", "layers.jsonl"):
        keys = [{k for x in (d / name).read_text().splitlines() for k in json.loads(x)}
                for d in (one, two)]  # fmt: skip
        assert keys[0] == keys[1] and len(keys[0]) > 10, name


# ---------------------------------------------------------------- events as data, W&B conventions

REASON = "sqnr_db 12.0 < 15.0 for 2 checks"
FALLBACKS = [  # three layers fall back at one step, as the guard reports them
    dict(kind="guard", step=5, layer=f"layers.{i}.mlp.w1", reason=REASON) for i in range(3)
]
for _ev in FALLBACKS:
    _ev.update({"from": "nvfp4", "to": "mxfp8"})  # keywords in Python


def test_offline_wandb_gets_events_as_table_rows_and_the_run_conventions(tmp_path, monkeypatch):
    """Real wandb, offline, read back from its own files: each event is a row of the
    `events/table` table; the run is named after run.name, with group and job type; loss is
    charted against tokens with min/max summaries."""
    from lptrain.config.schema import LoggingConfig
    from lptrain.observe.metrics import Monitor

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wb = WandbConfig(mode="offline", group="sweep-a", job_type="pretrain", tags=["fp4"])
    m = Monitor(LoggingConfig(progress="lines", wandb=wb), tmp_path, {"run": {"name": "nvfp4"}},
                10, rank=0)  # fmt: skip
    m.events(FALLBACKS)
    m.event({"kind": "spike", "step": 6, "loss": 9.5, "score": 6.25, "mean": 3.0})
    m.close()
    import wandb

    wandb.teardown()  # finish() can return before wandb's service has written the run file
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    run = wandb_file.read_wandb_file(path)
    assert run.run == {"name": "nvfp4", "group": "sweep-a", "job_type": "pretrain",
                       "tags": ["fp4"]}  # fmt: skip
    assert run.metrics["loss"] == {"step_metric": "tokens", "summary": ["last", "min"]}
    assert run.metrics["grad_norm"]["summary"] == ["last", "max"]
    rows = []
    for table in sorted(path.parent.glob("files/media/table/events/*.table.json")):
        data = json.loads(table.read_text())
        assert data["columns"] == [
            "step", "kind", "layer", "gemm", "operand", "from", "to", "reason", "detail",
        ]  # fmt: skip
        rows += data["data"]
    assert rows == [
        *(
            [5, "guard", f"layers.{i}.mlp.w1", None, None, "nvfp4", "mxfp8", REASON, None]
            for i in range(3)
        ),  # fmt: skip
        [6, "spike", None, None, None, None, None, None, "loss 9.5, score 6.25, mean 3.0"],
    ]
    counts = [(r["_step"], r.get("events/guard"), r.get("events/spike")) for r in run.history]
    assert counts == [(5, 3, None), (6, None, 1)]


def test_one_alert_per_kind_and_step_listing_its_layers(monkeypatch, tmp_path):
    """Online, three fallbacks at one step are one alert naming the three layers, under a
    title no other step or kind uses (W&B drops a repeat of a title within wait_duration)."""
    from lptrain.config.schema import LoggingConfig
    from lptrain.observe.metrics import Monitor

    alerts = []
    run = FakeRun()
    run.offline = False
    run.alert = lambda **kw: alerts.append(kw)
    run.define_metric = lambda *a, **kw: None
    _fake_wandb(monkeypatch, run)
    sys.modules["wandb"].AlertLevel = types.SimpleNamespace(WARN="WARN")
    sys.modules["wandb"].Table = lambda **kw: types.SimpleNamespace(add_data=lambda *row: None)
    m = Monitor(LoggingConfig(progress="lines", wandb=WandbConfig(mode="online")), tmp_path,
                {}, 10, rank=0)  # fmt: skip
    m.events(FALLBACKS)
    m.events([{**FALLBACKS[0], "step": 9}, {"kind": "divergence", "step": 9, "loss": 7.0}])
    assert [(a["title"], a["wait_duration"]) for a in alerts] == [
        ("lptrain: guard at step 5, 3 layers", 1),
        ("lptrain: guard at step 9, 1 layer", 1),
        ("lptrain: divergence at step 9", 1),
    ]
    assert alerts[0]["text"].splitlines() == [
        f"layer layers.{i}.mlp.w1, reason {REASON}, from nvfp4, to mxfp8" for i in range(3)
    ]


def test_wandb_group_job_type_and_name_are_config_keys():
    from lptrain.config.schema import parse

    raw = {"run": {"max_steps": 1},
           "logging": {"wandb": {"group": "g", "job_type": "finetune", "name": "n"}}}  # fmt: skip
    wb = parse(raw).logging.wandb
    assert (wb.group, wb.job_type, wb.name) == ("g", "finetune", "n")


def test_panel_key_puts_each_block_in_its_own_w_and_b_section():
    assert panel_key("quant/model.layers.12.self_attn.q_proj/output.input/amax") == (
        "quant.model.layers.12/self_attn.q_proj/output.input/amax"
    )
    for same in ("quant/lm_head/output.input/amax", "grad/layers.3.mlp.w1/norm", "loss"):
        assert panel_key(same) == same  # no block, or not a quantization statistic
    # A per-block key (monitor.aggregate: block) and a shadow recipe's keys: a section each
    assert panel_key("quant/layers.3/output.weight/amax") == "quant.layers.3/output.weight/amax"
    assert panel_key("shadow/mxfp8/layers.3.attn.wq/output.input/underflow") == (
        "shadow.mxfp8.layers.3/attn.wq/output.input/underflow"
    )
