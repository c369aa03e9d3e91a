import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY, run_cli


def test_grid_multirun_writes_a_summary_and_survives_a_failing_job(tmp_path, corpus_file, cache_dir):
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "sample=null", "test=false"]
    result = run_cli("-m", *args, "model.num_layers=1,2", "model.num_heads=2,3", "hydra.sweep.dir=sweep", cwd=tmp_path)
    sweep = tmp_path / "sweep"
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    for r in rows:  # the two jobs with 3 heads fail (3 does not divide width 32); the others still run
        assert r["status"] == ("failed" if "model.num_heads=3" in r["overrides"] else "completed")
        assert ("num_heads=3 does not divide" in r["error"]) == (r["status"] == "failed")
    assert all(float(r["objective"]) == float(r["best_val_loss"]) for r in rows if r["status"] == "completed")
    for r in rows:  # every completed job is a complete run directory
        if r["status"] == "completed":
            assert (sweep / r["job"] / "results.json").is_file()
            assert (sweep / r["job"] / "checkpoints" / "last.ckpt").is_file()
    table = (sweep / "summary.md").read_text()
    assert "| model.num_heads=3 model.num_layers=1 | failed |" in table
    assert "Sweep summary" in result.stdout + result.stderr


def _study(storage_path):
    import optuna

    return optuna.load_study(study_name="t", storage=f"sqlite:///{storage_path}")


def search_space(params: dict[str, str], sampler: str = "tpe") -> str:
    """An hparams_search config: gpt2lab's Optuna sweeper over ``params``, one directory per trial."""
    lines = "".join(f"      {k}: {v}\n" for k, v in params.items())
    return f"""# @package _global_
defaults:
  - override /hydra/sweeper: gpt2lab_optuna
  - override /hydra/sweeper/sampler: {sampler}
test: false
hydra:
  sweep:
    subdir: trial_${{optuna_trial}}
  sweeper:
    params:
{lines}"""


SEARCH_SPACE = search_space({"optimizer.lr": "tag(log, interval(1e-4, 1e-2))"})


def _sweep_args(corpus_file, cache_dir, sweep_dir, *extra):
    """A study ``t`` in ``sweep_dir`` over the learning rate only (model fields are pinned by TINY)."""
    conf = sweep_dir.parent / "conf"
    (conf / "hparams_search").mkdir(parents=True, exist_ok=True)
    (conf / "hparams_search" / "lr_only.yaml").write_text(SEARCH_SPACE)
    return [
        "-m", "--config-dir", str(conf), "hparams_search=lr_only", *TINY, f"data.path={corpus_file}",
        f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.study_name=t", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_optuna_study_resumes_and_exports_a_reproducible_best_trial(tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    first = run_cli(*_sweep_args(corpus_file, cache_dir, sweep, "hydra.sweeper.n_trials=4"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    trials = _study(sweep / "optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert set(trials[0].params) == {"optimizer.lr"}
    assert len({t.params["optimizer.lr"] for t in trials}) == 4
    for name in ("optimization_results.yaml", "optimization_history.png", "param_importances.png", "summary.csv"):
        assert (sweep / name).is_file(), name
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()

    again = run_cli(*_sweep_args(corpus_file, cache_dir, sweep, "hydra.sweeper.n_trials=2"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    study = _study(sweep / "optuna.db")
    assert [t.number for t in study.trials] == list(range(6))  # kept the 4, counted on
    assert all((sweep / f"trial_{n}" / "results.json").is_file() for n in range(6))

    export = subprocess.run(
        [sys.executable, "-m", "gpt2lab.hpo", "export-best", f"--storage=sqlite:///{sweep / 'optuna.db'}",
         "--study-name=t", "--name=best", f"--out={tmp_path / 'conf'}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    recipe = (tmp_path / "conf" / "experiment" / "best.yaml").read_text()
    assert "override /data: files" in recipe and "lr:" in recipe
    rerun = run_cli("--config-dir", str(tmp_path / "conf"), "experiment=best", "hydra.run.dir=rerun", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reproduced = json.loads((tmp_path / "rerun" / "results.json").read_text())["metrics"]["val/loss"]
    assert reproduced == pytest.approx(study.best_value, abs=1e-5)


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    args = _sweep_args(corpus_file, cache_dir, sweep, "hydra.sweeper.n_trials=3")
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "GPT2LAB_TRUSTED_TARGETS": "helpers.*"}
    workers = [subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    for w in workers:
        assert w.wait(timeout=600) == 0, w.stderr.read()[-3000:]
    trials = _study(sweep / "optuna.db").trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    assert len({t.user_attrs["run_dir"] for t in trials}) == 6


@pytest.mark.slow
def test_pruned_trials_are_pruned_and_failures_are_recorded(tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    prune = ["hydra.sweeper.pruner=median", "hydra.sweeper.n_startup_trials=1", "hydra.sweeper.n_warmup_steps=0",
             "hydra.sweeper.n_trials=1", "trainer.max_steps=16"]  # fmt: skip
    # A good trial sets the median; a trial that cannot learn (lr 1e-7) falls behind it at the first report.
    assert (
        run_cli(*_sweep_args(corpus_file, cache_dir, sweep, *prune, "optimizer.lr=3e-3"), cwd=tmp_path).returncode == 0
    )
    assert (
        run_cli(*_sweep_args(corpus_file, cache_dir, sweep, *prune, "optimizer.lr=1e-7"), cwd=tmp_path).returncode == 0
    )
    # A trial that raises (3 heads do not divide width 32) is FAIL with its error; the sweep completes.
    failing = run_cli(
        *_sweep_args(corpus_file, cache_dir, sweep, *prune, "model.num_heads=3", "hydra.sweeper.max_failure_rate=1.0"),
        cwd=tmp_path,
    )
    assert failing.returncode == 0, failing.stderr[-3000:]
    good, pruned, failed = _study(sweep / "optuna.db").trials
    assert (good.state.name, pruned.state.name, failed.state.name) == ("COMPLETE", "PRUNED", "FAIL")
    assert pruned.user_attrs["pruned_at_step"] < 16
    assert "num_heads=3 does not divide" in failed.user_attrs["error"]
    rows = {r["job"]: r["status"] for r in csv.DictReader((sweep / "summary.csv").open())}
    assert rows == {"trial_0": "completed", "trial_1": "pruned", "trial_2": "failed"}


def test_a_sweep_failing_everywhere_stops(tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    result = run_cli(
        *_sweep_args(corpus_file, cache_dir, sweep, "model.num_heads=3", "hydra.sweeper.n_trials=10"),
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "4 of 4 trials failed (hydra.sweeper.max_failure_rate=0.5)" in result.stderr
    assert len(_study(sweep / "optuna.db").trials) == 4


@pytest.mark.slow
def test_joblib_launcher_runs_trials_in_parallel_processes(tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    parallel = [
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    ]
    result = run_cli(*_sweep_args(corpus_file, cache_dir, sweep, *parallel), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _study(sweep / "optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all((sweep / f"trial_{t.number}" / "checkpoints" / "last.ckpt").is_file() for t in trials)
    threads = max(1, (os.cpu_count() or 1) // 2)  # two jobs at once share the cores
    assert all(
        f"of 2: {threads} CPU thread(s)" in (sweep / f"trial_{t.number}" / "train.log").read_text() for t in trials
    )


def test_slurm_launcher_config_composes():
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from gpt2lab.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                "hparams_search=optuna",
                "hydra/launcher=submitit_slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=1",
                "trainer=gpu",
                "trainer.num_nodes=1",
            ],  # fmt: skip
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.sweeper.pruner == "median"


GRID = search_space({"optimizer.lr": "choice(1e-3, 3e-3)", "scheduler.warmup_steps": "choice(10, 20)"}, "grid")


@pytest.mark.slow
def test_grid_sampler_covers_the_grid_once(tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    args = _sweep_args(corpus_file, cache_dir, sweep, "hydra.sweeper.n_trials=10")
    (tmp_path / "conf" / "hparams_search" / "grid.yaml").write_text(GRID)
    result = run_cli(*[("hparams_search=grid" if a == "hparams_search=lr_only" else a) for a in args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _study(sweep / "optuna.db").trials
    params = sorted((t.params["optimizer.lr"], t.params["scheduler.warmup_steps"]) for t in trials)
    assert params == [(1e-3, 10), (1e-3, 20), (3e-3, 10), (3e-3, 20)]  # n_trials=10 capped at the grid's 4


@pytest.mark.parametrize(
    ("sampler", "target"),
    [("tpe", "TPESampler"), ("random", "RandomSampler"), ("cmaes", "CmaEsSampler"), ("grid", "GridSampler")],
)
def test_samplers_are_selectable(sampler, target):
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from gpt2lab.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "train", overrides=["hparams_search=optuna", f"hydra/sweeper/sampler={sampler}"], return_hydra_config=True
        )
    assert cfg.hydra.sweeper.sampler._target_.endswith(target)
    assert "seed" in cfg.hydra.sweeper.sampler
