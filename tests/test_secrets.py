"""Secrets stay out of what runs write (gpt2lab/secrets.py), and a crafted checkpoint runs nothing when loaded."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from gpt2lab.checkpoint import load_checkpoint
from gpt2lab.errors import ConfigError
from gpt2lab.secrets import install_log_redaction, is_secret_key, redact, redact_config, remember_secrets
from gpt2lab.sweep.summary import SweepSummary


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
        (
            "postgresql+psycopg2://user:s3cr%40t@db.example.com:5432/optuna",
            "postgresql+psycopg2://user:***@db.example.com:5432/optuna",
        ),
        ("mysql://u:pw@host:3306/db?charset=utf8mb4&ssl=true", "mysql://u:***@host:3306/db?charset=utf8mb4&ssl=true"),
        (
            "postgresql://host/db?user=u&password=hunter2&sslmode=require",
            "postgresql://host/db?user=u&password=***&sslmode=require",
        ),
        ("redis://:pw@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("Study t in postgresql://u:pw@h/db: 3 trials so far", "Study t in postgresql://u:***@h/db: 3 trials so far"),
        # nothing to hide: no password, or no userinfo at all
        ("postgresql://user@host:5432/db", "postgresql://user@host:5432/db"),
        ("sqlite:////tmp/outputs/optuna/t/optuna.db", "sqlite:////tmp/outputs/optuna/t/optuna.db"),
        ("https://api.wandb.ai:443/graphql?x=1", "https://api.wandb.ai:443/graphql?x=1"),
        ("user:pw@host", "user:pw@host"),  # not a URL: no scheme
        # Hydra overrides, override_dirname and dicts in overrides: by the key's name
        ("+hydra.job.env_set.HF_TOKEN=hf_abc", "+hydra.job.env_set.HF_TOKEN=***"),
        ("data.batch_size=8,logger.db_password=pw,seed=1", "data.batch_size=8,logger.db_password=***,seed=1"),
        (
            "+logger.wandb.settings={api_key: abc, mode: offline}",
            "+logger.wandb.settings={api_key: ***, mode: offline}",
        ),
        ("{'api_key': 'abc', 'x_label': 'rank0'}", "{'api_key': ***, 'x_label': 'rank0'}"),
        ("sample.max_new_tokens=8 tokenizer=bpe", "sample.max_new_tokens=8 tokenizer=bpe"),
    ],
)
def test_redact_masks_url_passwords_and_secret_keys_in_text(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize(
    "name", ["password", "db_password", "hf_token", "HF_TOKEN", "WANDB_API_KEY", "apiKey", "api-key", "client_secret",
             "AWS_SECRET_ACCESS_KEY", "private_key", "accessToken"],
)  # fmt: skip
def test_secret_key_names(name):
    assert is_secret_key(name)


@pytest.mark.parametrize(
    "name", ["tokenizer", "max_new_tokens", "TOKENIZERS_PARALLELISM", "eos_token", "pad_token", "PWD", "storage",
             "monkey", "key", "secrets_dir"],
)  # fmt: skip
def test_names_that_are_not_secrets(name):
    assert not is_secret_key(name)


def test_redact_config_resolves_then_masks_and_leaves_the_jobs_config_alone(monkeypatch):
    monkeypatch.setenv("DB_PASSWORD_FOR_TEST", "correct-horse-battery")
    monkeypatch.setenv("STORAGE_FOR_TEST", "postgresql://trainer:correct-horse@db:5432/optuna")
    cfg = OmegaConf.create(
        {
            "db": {"password": "${oc.env:DB_PASSWORD_FOR_TEST}", "user": "trainer"},
            "storage": "${oc.env:STORAGE_FOR_TEST}",
            "hub": {"hf_token": None, "token_file": "", "api_key": {"nested": "x"}},
            "overrides": ["a=1", "+x.api_key=abc"],
            "n": 3,
        }
    )
    assert redact_config(cfg, resolve=True) == {
        "db": {"password": "***", "user": "trainer"},
        "storage": "postgresql://trainer:***@db:5432/optuna",
        "hub": {"hf_token": None, "token_file": "", "api_key": "***"},  # unset stays visible; a node goes whole
        "overrides": ["a=1", "+x.api_key=***"],
        "n": 3,
    }
    # unresolved (as Hydra writes .hydra/): the interpolation names where the value comes from, not the value
    assert redact_config(cfg)["storage"] == "${oc.env:STORAGE_FOR_TEST}"
    assert cfg.db.password == "correct-horse-battery"  # the job's own config keeps the real values
    assert cfg.storage == "postgresql://trainer:correct-horse@db:5432/optuna"


def test_log_records_show_no_known_secret(caplog):
    api_key = "wk" + "7" * 38
    remember_secrets(OmegaConf.create({"logger": {"token": "tok-" + "q" * 20}}), environ={"WANDB_API_KEY": api_key})
    install_log_redaction()
    log = logging.getLogger("gpt2lab.test_secrets")
    with caplog.at_level(logging.INFO, logger="gpt2lab.test_secrets"):
        log.info("storage %s, key %s, token %s", "postgresql://u:pw@h/db", api_key, "tok-" + "q" * 20)
        try:
            raise RuntimeError(f"login failed for {api_key}")
        except RuntimeError:
            log.exception("wandb")
    assert "storage postgresql://u:***@h/db, key ***, token ***" in caplog.text
    assert "RuntimeError: login failed for ***" in caplog.text  # the traceback too
    assert api_key not in caplog.text and "q" * 20 not in caplog.text


def test_sweep_summary_redacts_overrides_and_errors(tmp_path):
    job_dir = tmp_path / "sweep" / "0"
    job_dir.mkdir(parents=True)
    hydra = {
        "mode": RunMode.MULTIRUN,
        "sweep": {"dir": str(tmp_path / "sweep")},
        "runtime": {"output_dir": str(job_dir)},
    }
    cfg = OmegaConf.create({"optimized_metric": "val/loss", "hydra": hydra})
    overrides = ["model.num_layers=1", "+hydra.job.env_set.HF_TOKEN=hf_abcdef"]
    error = ConnectionError("could not reach postgresql://user:pw@db:5432/optuna")
    SweepSummary().on_job_end(cfg, JobReturn(overrides, cfg, cfg, status=JobStatus.FAILED, _return_value=error))
    summary = json.loads((job_dir / "job_summary.json").read_text())
    assert summary["overrides"] == "model.num_layers=1 +hydra.job.env_set.HF_TOKEN=***"
    assert summary["error"] == "ConnectionError: could not reach postgresql://user:***@db:5432/optuna"
    for name in ("summary.csv", "summary.md"):
        text = (tmp_path / "sweep" / name).read_text()
        assert "hf_abcdef" not in text and ":pw@" not in text and "postgresql://user:***@db" in text


def grep(root: Path, *secrets: str) -> list[str]:
    """Every file under ``root`` (binary ones too: checkpoints, wandb's run file) that contains one of ``secrets``."""
    return [
        f"{path}: {s}" for path in root.rglob("*") if path.is_file() for s in secrets if s.encode() in path.read_bytes()
    ]


def test_a_multirun_writes_and_logs_no_secret(tmp_path, corpus_file, cache_dir, train_cli):
    """A wandb key in the environment and as a logger setting, a token and a database URL given to the jobs through
    Hydra's env_set: nowhere in the sweep directory (.hydra/, multirun.yaml, config.yaml, the job's log, CSV and
    wandb hyper-parameters, wandb's record of the command line, the sweep summary), nor in the console output,
    where Hydra also lists a failed job's overrides (3 heads do not divide a width of 32)."""
    pytest.importorskip("wandb")
    env_key, logger_key, hf_token, db_password = "wk" + "E" * 38, "wk" + "L" * 38, "hf_" + "T" * 34, "Db-pa55word"
    database_url = f"postgresql://trainer:{db_password}@db.internal:5432/runs"
    env = {"WANDB_API_KEY": env_key, "NETRC": str(tmp_path / "no-netrc"), "WANDB_CONFIG_DIR": str(tmp_path / "wcfg")}
    result = train_cli(
        "-m", *TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "hydra.sweep.dir=sweep",
        "sample=null", "test=false", "logger=wandb", "logger.wandb.mode=offline", "model.num_heads=2,3",
        f"+logger.wandb.settings={{api_key:{logger_key}}}",
        f"+hydra.job.env_set.HF_TOKEN={hf_token}", f"+hydra.job.env_set.DATABASE_URL={database_url}",
        cwd=tmp_path, env=env,
    )  # fmt: skip
    secrets = (env_key, logger_key, hf_token, db_password)
    assert result.returncode == 1, result.stderr[-3000:]  # Hydra raises the failed job's error at the end
    assert "Error executing job with overrides: [" in result.stderr and "{api_key:***}']" in result.stderr
    assert grep(tmp_path, *secrets) == []
    assert not [s for s in secrets if s in result.stdout + result.stderr]
    sweep, job = tmp_path / "sweep", tmp_path / "sweep" / "0"
    assert (job / "metrics.csv").is_file() and list(job.glob("wandb/offline-run-*/run-*.wandb"))  # it did run
    redacted_url = "postgresql://trainer:***@db.internal:5432/runs"
    for hydra_yaml in (sweep / "multirun.yaml", job / ".hydra" / "hydra.yaml"):
        env_set = OmegaConf.load(hydra_yaml).hydra.job.env_set
        assert dict(env_set) == {"HF_TOKEN": "***", "DATABASE_URL": redacted_url}
    assert OmegaConf.load(job / ".hydra" / "overrides.yaml")[-1] == "+logger.wandb.settings={api_key:***}"
    for config_file in (job / "config.yaml", job / ".hydra" / "config.yaml"):
        assert OmegaConf.load(config_file).logger.wandb.settings.api_key == "***"
    assert OmegaConf.load(job / "hparams.yaml").config.logger.wandb.settings.api_key == "***"
    assert "{api_key:***}" in json.loads((job / "job_summary.json").read_text())["overrides"]
    assert "{api_key:***}" in result.stdout + result.stderr  # Hydra's launcher lists each job's overrides


@pytest.mark.parametrize(
    "entry_point", ["gpt2lab.evaluate", "gpt2lab.generate", "gpt2lab.export", "gpt2lab.chat", "gpt2lab.check"]
)
def test_the_other_entry_points_write_no_secret(tmp_path, run_main, entry_point):
    """They share conf/hydra/default.yaml: their .hydra/ and log hold no secret either (here a run that stops at
    once on bad input, after Hydra has written both)."""
    token = "hf_" + "X" * 34
    result = run_main(entry_point, "ckpt=missing.ckpt", f"+hydra.job.env_set.HF_TOKEN={token}", cwd=tmp_path)
    assert result.returncode == 1 and "Error:" in result.stderr
    (hydra_yaml,) = tmp_path.glob("outputs/**/.hydra/hydra.yaml")
    assert OmegaConf.load(hydra_yaml).hydra.job.env_set.HF_TOKEN == "***"
    assert grep(tmp_path, token) == [] and token not in result.stdout + result.stderr


class _Payload:
    """What a crafted checkpoint holds: unpickling it calls ``os.makedirs(marker)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def test_a_crafted_checkpoint_runs_no_code_when_loaded(tmp_path, corpus_file, cache_dir, run_main, train_cli):
    """Loaded as a model (load_checkpoint, generate's ckpt=) or resumed from (train's ckpt_path=): refused."""
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "payload": _Payload(marker)}, ckpt)
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        load_checkpoint(ckpt)
    result = run_main("gpt2lab.generate", f"ckpt={ckpt}", "prompt=def", cwd=tmp_path)
    assert result.returncode == 1 and "not a readable checkpoint" in result.stderr
    tiny = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}"]
    result = train_cli(*tiny, f"ckpt_path={ckpt}", "hydra.run.dir=resumed", cwd=tmp_path)
    assert result.returncode == 1 and "not a readable checkpoint" in result.stderr
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # what an unrestricted torch.load does with the same file
    assert marker.is_dir()


@pytest.fixture
def password_postgres(tmp_path_factory):
    """A PostgreSQL server that checks passwords (scram-sha-256): its URL, with the password."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[dev]')")
    from test_postgres import _server_binaries, start_server

    bindir = _server_binaries()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="gpt2lab-pg-"))  # not under pytest's root-only tmp: the server user reads it
    password = "Pg-" + "s3cret" * 4
    (root / "pw").write_text(password)
    (root / "sock").mkdir()
    as_postgres = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            pytest.skip("running as root without a 'postgres' user to run the server as")
        for path in (root, root / "pw", root / "sock"):
            shutil.chown(path, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    run = lambda *cmd: subprocess.run([*as_postgres, *cmd], check=True, capture_output=True)  # noqa: E731
    run(
        f"{bindir}/initdb", "-D", str(root / "data"), "-A", "scram-sha-256", "-U", "postgres", f"--pwfile={root / 'pw'}"
    )
    port = start_server(bindir, root / "data", root / "sock", as_postgres)
    yield f"postgresql+psycopg2://postgres:{password}@127.0.0.1:{port}/postgres", password
    run(f"{bindir}/pg_ctl", "-D", str(root / "data"), "-m", "fast", "stop")
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_an_optuna_study_in_postgresql_keeps_its_password_out(tmp_path, corpus_file, cache_dir, password_postgres):
    """The storage URL on the command line, then from the environment: the trials run against the server (which
    checks the password, so the real one was used) and the password is nowhere in the sweep directory or output."""
    import optuna
    from test_sweep import _sweep_args

    url, password = password_postgres
    redacted = url.replace(password, "***")
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "OPTUNA_STORAGE": url}
    outputs, study = [], tmp_path / "study"
    for storage in (url, "${oc.env:OPTUNA_STORAGE}"):
        args = _sweep_args(
            corpus_file, cache_dir, study, "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={storage}"
        )
        command = [sys.executable, str(REPO / "train.py"), *args]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout + done.stderr)
    trials = optuna.load_study(study_name="t", storage=url).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert grep(tmp_path, password) == [] and not [o for o in outputs if password in o]
    assert f"Study t in {redacted}" in outputs[0] and f"Study t in {redacted}" in outputs[1]  # the log line, redacted
    hydra_yaml = [yaml.safe_load((study / t / ".hydra" / "hydra.yaml").read_text()) for t in ("trial_0", "trial_1")]
    # the second as given: the name of the variable, not its value
    assert [h["hydra"]["sweeper"]["storage"] for h in hydra_yaml] == [redacted, "${oc.env:OPTUNA_STORAGE}"]


def test_an_optuna_study_in_sqlite_records_no_secret(tmp_path, corpus_file, cache_dir, train_cli):
    """The trial's overrides and error, which the sweeper records in the study (the SQLite file in the sweep
    directory by default), are redacted like the files beside them."""
    db_password = "Db-pa55word-in-optuna"
    database_url = f"postgresql://trainer:{db_password}@db.internal:5432/runs"
    result = train_cli(
        "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=1", *TINY, f"data.path={corpus_file}",
        f"paths.cache_dir={cache_dir}", "hydra.sweep.dir=sweep", "sample=null", "test=false",
        "model.num_heads=3", f"+hydra.job.env_set.DATABASE_URL={database_url}", f"+data.hf_token={db_password}",
        cwd=tmp_path,
    )  # fmt: skip
    db = next((tmp_path / "outputs" / "optuna").rglob("optuna.db"), None) or next(tmp_path.rglob("optuna.db"))
    assert db.is_file(), result.stderr[-3000:]
    assert grep(tmp_path, db_password) == []
    import optuna

    (trial,) = optuna.load_study(study_name="gpt2lab_tiny", storage=f"sqlite:///{db}").trials
    assert trial.user_attrs["+data.hf_token"] == "***"
    assert "+data.hf_token=***" in trial.user_attrs["overrides"]
