"""logger=wandb, offline (no credentials here): each run's config, metric history, summary and samples table are
read back from what wandb wrote, for a single run, a resumed run, a multirun with a failing job, an Optuna study,
logger=many and DDP."""

from __future__ import annotations

import csv
import json
import struct
import time
from pathlib import Path

import pytest
from conftest import TINY, run_cli

from gpt2lab.lit.loggers import finish_wandb_run

pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

BLOCK = 32768  # wandb's run file: a 7-byte header, then LevelDB-style log blocks of records


def read_run(run_dir: Path, timeout: float = 30.0) -> dict:
    """What the one offline wandb run under ``run_dir/wandb`` recorded: its run record, config, history rows,
    summary and exit code. wandb's service process may still be writing the last records when ``wandb.finish``
    has returned: read again until the exit record is there."""
    deadline = time.monotonic() + timeout
    while (run := _read_run(run_dir))["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return run


def _read_run(run_dir: Path) -> dict:
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, payload = path.read_bytes(), 7, b""
    run = {"history": [], "summary": {}, "config": {}, "exit_code": None, "dir": path.parent}
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = payload + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):  # a record's first or middle part
            continue
        record = wandb_internal_pb2.Record.FromString(payload)
        payload = b""
        which = record.WhichOneof("record_type")
        if which == "run":
            run["record"] = record.run
            run["config"] |= {_key(i): json.loads(i.value_json) for i in record.run.config.update}
        elif which == "config":
            run["config"] |= {_key(i): json.loads(i.value_json) for i in record.config.update}
        elif which == "history":
            run["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif which == "summary":
            run["summary"] |= {_key(i): json.loads(i.value_json) for i in record.summary.update}
        elif which == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No WANDB_API_KEY and no ~/.netrc: as on a machine nobody logged in on."""
    env = {"NETRC": str(tmp_path / "no-netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


def args(corpus_file, cache_dir, *extra: str) -> list[str]:
    return ["logger=wandb", *TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", *extra]


def test_a_run_logs_config_metrics_and_samples_offline_and_a_resumed_run_continues_it(
    train_cli, tmp_path, corpus_file, cache_dir, no_credentials, monkeypatch
):
    # MFU is logged where the device's peak is known (GPUs): give this CPU one, so that it is logged here too.
    monkeypatch.setattr("gpt2lab.lit.callbacks.peak_flops", lambda device, dtype: 1e12)
    first = tmp_path / "first"
    result = train_cli(*args(corpus_file, cache_dir, f"hydra.run.dir={first}"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "no wandb credentials" in log and "logs offline" in log
    run = read_run(first)
    assert f"wandb sync {run['dir']}" in log
    assert run["exit_code"] == 0
    assert run["record"].job_type == "train" and run["record"].project == "gpt2lab"
    assert run["config"]["config"]["model"]["d_model"] == 32  # the resolved config
    assert run["config"]["data_stats"]["train"]["tokens"] > 0
    logged = {key for row in run["history"] for key in row}
    assert {"train/loss", "val/loss", "val/bpb", "lr", "perf/tokens_per_sec", "perf/mfu", "test/loss"} <= logged
    val_steps = [row["trainer/global_step"] for row in run["history"] if "val/loss" in row]
    csv_steps = [int(r["step"]) for r in csv.DictReader((first / "metrics.csv").open()) if r["val/loss"]]
    assert val_steps == csv_steps and len(val_steps) == 3  # step 0, then two validations in 8 steps
    assert run["summary"]["test/loss"] > 0
    table = run["summary"]["samples/path"]  # the samples callback's table, every sample so far
    rows = json.loads((run["dir"] / "files" / table).read_text())
    assert rows["columns"] == ["step", "prompt", "completion"]
    samples = [json.loads(line) for line in (first / "samples.jsonl").read_text().splitlines()]
    assert rows["data"] == [[r["step"], r["prompt"], r["completion"]] for r in samples]  # the same as samples.jsonl
    assert [r[0] for r in rows["data"]] == [4, 4, 8, 8]  # two prompts at each of the two validations

    resumed = tmp_path / "resumed"
    result = train_cli(
        *args(corpus_file, cache_dir, f"hydra.run.dir={resumed}", "trainer.max_steps=12"),
        f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    again = read_run(resumed)
    assert again["record"].run_id == run["record"].run_id  # the same wandb run goes on
    assert min(row["trainer/global_step"] for row in again["history"] if "train/loss" in row) > 7
    table = json.loads((again["dir"] / "files" / again["summary"]["samples/path"]).read_text())
    assert [r[0] for r in table["data"]] == [4, 4, 8, 8, 12, 12]  # the samples table goes on from the checkpoint


def test_each_multirun_job_is_its_own_run_in_one_group_and_a_failing_job_shows_as_failed(
    train_cli, tmp_path, corpus_file, cache_dir, no_credentials
):
    result = train_cli(
        "-m", *args(corpus_file, cache_dir, "hydra.sweep.dir=sweep", "trainer.max_steps=20"),
        "optimizer.lr=0.004,3000",  # the second job diverges
        cwd=tmp_path,
    )  # fmt: skip
    finished, failed = read_run(tmp_path / "sweep" / "0"), read_run(tmp_path / "sweep" / "1")
    assert finished["record"].run_id != failed["record"].run_id
    assert finished["record"].run_group == failed["record"].run_group == "sweep"
    assert {finished["record"].job_type, failed["record"].job_type} == {"job"}
    assert finished["record"].display_name == "optimizer.lr=0.004"
    assert failed["record"].display_name == "optimizer.lr=3000"
    assert finished["exit_code"] == 0 and failed["exit_code"] == 1, result.stderr[-3000:]
    # The second job logged into its own run, not into the first one's.
    assert max(row.get("lr", 0) for row in finished["history"]) < 0.01
    assert all(row["optimizer"]["lr"] == 3000 for row in [failed["config"]["config"]])


LR_GRID = """# @package _global_
defaults:
  - override /hydra/sweeper: gpt2lab_optuna
  - override /hydra/sweeper/sampler: grid
test: false
hydra:
  sweep:
    subdir: trial_${optuna_trial}
  sweeper:
    n_trials: 2
    max_failure_rate: 1.0
    params:
      optimizer.lr: choice(0.004, 3000)
"""


def test_optuna_trials_are_runs_of_one_group_with_their_number_and_state(
    train_cli, tmp_path, corpus_file, cache_dir, no_credentials
):
    (tmp_path / "conf" / "hparams_search").mkdir(parents=True)
    (tmp_path / "conf" / "hparams_search" / "lr_grid.yaml").write_text(LR_GRID)
    result = train_cli(
        "-m", "--config-dir", str(tmp_path / "conf"), "hparams_search=lr_grid",
        *args(corpus_file, cache_dir, "hydra.sweep.dir=study", "hydra.sweeper.study_name=s", "trainer.max_steps=20"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trials = {n: read_run(tmp_path / "study" / f"trial_{n}") for n in (0, 1)}
    by_lr = {run["config"]["config"]["optimizer"]["lr"]: (n, run) for n, run in trials.items()}
    assert set(by_lr) == {0.004, 3000}  # the grid sampler's order is its own
    for lr, state, code in ((0.004, "COMPLETE", 0), (3000, "FAIL", 1)):  # lr 3000 diverges
        number, run = by_lr[lr]
        assert run["summary"]["optuna/trial"] == number and run["summary"]["optuna/state"] == state
        assert run["exit_code"] == code
        assert run["record"].job_type == "trial" and run["record"].run_group == "study"
        assert run["record"].display_name == f"optimizer.lr={lr}"


def test_logger_many_writes_csv_tensorboard_and_wandb_and_a_wandb_mode_set_by_the_user_is_kept(
    train_cli, tmp_path, corpus_file, cache_dir, no_credentials
):
    run = tmp_path / "many"
    result = train_cli(
        *args(corpus_file, cache_dir, f"hydra.run.dir={run}", "logger.wandb.tags=baseline", "test=false"),
        "logger=many",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no wandb credentials" not in result.stdout + result.stderr  # offline because the user said so
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(r["val/loss"] for r in rows) and any(r["train/loss"] for r in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])
    logged = read_run(run)
    assert logged["exit_code"] == 0 and logged["record"].tags == ["baseline"]  # a string is one tag
    assert [r["trainer/global_step"] for r in logged["history"] if "val/loss" in r] == [
        int(r["step"]) for r in rows if r["val/loss"]
    ]


def test_the_mode_is_online_with_credentials_and_a_server_that_answers_else_offline(
    tmp_path, no_credentials, monkeypatch, caplog
):
    """The choice of mode (mode=None: online when possible), read from the arguments Lightning's WandbLogger is
    built with; the server's reachability is a stand-in, wandb.init waits for the first log."""
    from pytorch_lightning.loggers import WandbLogger

    from gpt2lab.lit.loggers import wandb_logger

    built = []

    class RecordingWandbLogger(WandbLogger):
        def __init__(self, **kwargs):
            built.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr("gpt2lab.lit.loggers.WandbLogger", RecordingWandbLogger)
    reachable = []
    monkeypatch.setattr("gpt2lab.hub.reachable", lambda host, port: reachable.append(host) or answers)

    answers = True  # no credentials: offline, and the server is not even asked
    wandb_logger(save_dir=str(tmp_path))
    assert built[-1]["mode"] == "offline" and reachable == []
    assert "no wandb credentials" in caplog.text

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    caplog.clear()
    wandb_logger(log_model="all", save_dir=str(tmp_path))
    assert built[-1]["mode"] == "online" and built[-1]["log_model"] == "all" and len(reachable) == 1
    assert "offline" not in caplog.text

    answers = False
    wandb_logger(save_dir=str(tmp_path))
    assert built[-1]["mode"] == "offline"
    assert "the wandb server at https://api.wandb.ai is unreachable" in caplog.text


def test_an_optuna_trial_records_its_number_and_state(tmp_path, no_credentials):
    import wandb

    for number, outcome, state, code in ((3, "pruned", "PRUNED", 0), (4, "failed", "FAIL", 1)):
        wandb.init(project="gpt2lab", mode="offline", dir=tmp_path / str(number))
        finish_wandb_run(outcome, optuna_trial=number)
        run = read_run(tmp_path / str(number))
        assert run["summary"]["optuna/trial"] == number and run["summary"]["optuna/state"] == state
        assert run["exit_code"] == code
    assert wandb.run is None


@pytest.mark.parametrize(
    "override, env, message",
    [
        (
            "logger.wandb.log_model=true",
            {},
            "logger.wandb.log_model=True uploads checkpoints as artifacts, which an offline run",
        ),
        (
            "logger.wandb.log_model=all",
            {"WANDB_MODE": "offline"},
            "logger.wandb.log_model=all uploads checkpoints as artifacts, which an offline run cannot do (WANDB_MODE=offline)",
        ),
        ("logger.wandb.mode=online", {}, "logger.wandb.mode=online, but no wandb credentials"),
        ("logger.wandb.mode=null", {"WANDB_MODE": "online"}, "WANDB_MODE=online, but no wandb credentials"),
        ("logger.wandb.mode=cloud", {}, "logger.wandb.mode='cloud': expected one of online, offline, disabled"),
        ("logger.wandb.mode=null", {"WANDB_MODE": "cloud"}, "WANDB_MODE='cloud': expected one of online, offline"),
        (
            "logger.wandb.log_model=true",
            {"WANDB_MODE": "dryrun"},
            "logger.wandb.log_model=True uploads checkpoints as artifacts, which an offline run cannot do (WANDB_MODE=dryrun)",
        ),
        ("+logger.wandb.projet=x", {}, "logger.wandb.projet: not a wandb setting (did you mean project?)"),
        ("+logger.wandb.resume=must", {}, "logger.wandb.resume: gpt2lab sets it; a run resumed from a checkpoint"),
        ("logger.wandb.id=abc/def", {}, "logger.wandb.id='abc/def': Run ID cannot contain the characters"),
        ("logger.wandb.project=me/gpt2", {}, "logger.wandb.project='me/gpt2': Invalid project name"),
    ],
)
def test_wandb_settings_that_cannot_work_are_refused_at_start(
    train_cli, tmp_path, corpus_file, cache_dir, no_credentials, override, env, message
):
    run = tmp_path / "r"
    result = train_cli(*args(corpus_file, cache_dir, f"hydra.run.dir={run}", override), cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert f"Error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run / "wandb").exists() and not (run / "checkpoints").exists()


@pytest.mark.slow
def test_under_ddp_only_rank_zero_logs_one_run(tmp_path, corpus_file, cache_dir, no_credentials):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    result = run_cli(
        *args(corpus_file, cache_dir, "hydra.run.dir=run", *ddp), cwd=tmp_path, env=no_credentials, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = read_run(tmp_path / "run")  # exactly one offline run (read_run unpacks one file)
    assert run["exit_code"] == 0 and any("val/loss" in row for row in run["history"])
