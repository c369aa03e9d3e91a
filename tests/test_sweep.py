import csv
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import REPO, TINY, run_cli
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gpt2lab.sweep.optuna_sweeper import OptunaSweeper
from gpt2lab.sweep.summary import SweepSummary


def test_grid_multirun_writes_a_summary_and_survives_a_failing_job(train_cli, tmp_path, corpus_file, cache_dir):
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "sample=null", "test=false"]
    result = train_cli(
        "-m", *args, "model.num_layers=1,2", "model.num_heads=2,3", "hydra.sweep.dir=sweep", cwd=tmp_path
    )
    sweep = tmp_path / "sweep"
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4
    for r in rows:  # the two jobs with 3 heads fail (3 does not divide width 32); the others still run
        assert r["status"] == ("failed" if "model.num_heads=3" in r["overrides"] else "finished")
        assert ("num_heads=3 does not divide" in r["error"]) == (r["status"] == "failed")
    assert all(float(r["objective"]) == float(r["best_val_loss"]) for r in rows if r["status"] == "finished")
    for r in rows:  # every completed job is a complete run directory
        if r["status"] == "finished":
            assert (sweep / r["name"] / "results.json").is_file()
            assert (sweep / r["name"] / "checkpoints" / "last.ckpt").is_file()
    table = (sweep / "summary.md").read_text()
    assert "| model.num_heads=3 model.num_layers=1 | failed   |" in table  # columns padded to their width
    assert (sweep / "curves.png").read_bytes().startswith(b"\x89PNG")  # the finished jobs' validation curves
    assert all((sweep / r["name"] / "curves.png").is_file() for r in rows if r["status"] == "finished")
    assert "Sweep summary" in result.stdout + result.stderr
    # The sweep ends in the failed job's Error: line, not its traceback (issue 27 #9)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("Error: model.num_heads=3 does not divide")


def _study(storage_path):
    import optuna

    return optuna.load_study(study_name="t", storage=f"sqlite:///{storage_path}")


def search_space(params: dict[str, str], sampler: str = "tpe") -> str:
    """An hparams_search config: gpt2lab's Optuna sweeper over ``params``, one directory per trial, the sampler
    seeded as in ``hparams_search=optuna``."""
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
    sampler:
      seed: ${{seed}}
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
def test_optuna_study_resumes_and_exports_a_reproducible_best_trial(train_cli, tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    first = train_cli(*_sweep_args(corpus_file, cache_dir, sweep, "hydra.sweeper.n_trials=4"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    trials = _study(sweep / "optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert set(trials[0].params) == {"optimizer.lr"}
    assert len({t.params["optimizer.lr"] for t in trials}) == 4
    for name in ("optimization_results.yaml", "optimization_history.png", "param_importances.png", "summary.csv"):
        assert (sweep / name).is_file(), name
    assert "best_value" in (sweep / "optimization_results.yaml").read_text()

    again = train_cli(*_sweep_args(corpus_file, cache_dir, sweep, "hydra.sweeper.n_trials=2"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    study = _study(sweep / "optuna.db")
    assert [t.number for t in study.trials] == list(range(6))  # kept the 4, counted on
    assert len({t.params["optimizer.lr"] for t in study.trials}) == 6  # and proposed new points, not the seed's again
    assert all((sweep / f"trial_{n}" / "results.json").is_file() for n in range(6))

    export = subprocess.run(
        [sys.executable, "-m", "gpt2lab.sweep", "export-best", f"--storage=sqlite:///{sweep / 'optuna.db'}",
         "--study-name=t", "--name=best", f"--out={tmp_path / 'conf'}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    recipe = (tmp_path / "conf" / "experiment" / "best.yaml").read_text()
    assert "override /data: files" in recipe and "lr:" in recipe
    rerun = train_cli("--config-dir", str(tmp_path / "conf"), "experiment=best", "hydra.run.dir=rerun", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reproduced = json.loads((tmp_path / "rerun" / "results.json").read_text())["metrics"]["val/loss"]
    assert reproduced == pytest.approx(study.best_value, abs=1e-5)


def test_export_best_refuses_to_replace_a_recipe_unless_forced(tmp_path, capsys):
    from gpt2lab.sweep.__main__ import main as sweep_main

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="t", storage=storage)
    for lr in (0.01, 0.001):
        trial = study.ask()
        trial.set_user_attr("overrides", ["data=files", f"optimizer.lr={lr}", "hydra.sweeper.n_trials=2"])
        study.tell(trial, lr)  # the smaller lr is the best trial
    args = ["export-best", f"--storage={storage}", "--study-name=t", "--name=best", f"--out={tmp_path / 'conf'}"]
    recipe = tmp_path / "conf" / "experiment" / "best.yaml"
    sweep_main(args)
    assert f"Wrote {recipe}; reproduce it with: python train.py experiment=best --config-dir {tmp_path / 'conf'}" in (
        capsys.readouterr().out
    )
    text = recipe.read_text()
    assert "override /data: files" in text and "lr: 0.001" in text and "n_trials" not in text

    recipe.write_text("# my own recipe\n")
    with pytest.raises(SystemExit) as refused:
        sweep_main(args)
    assert refused.value.code == 1
    assert capsys.readouterr().err == f"Error: {recipe} exists: choose another name, or pass --force to replace it\n"
    assert recipe.read_text() == "# my own recipe\n"
    sweep_main([*args, "--force"])
    assert "lr: 0.001" in recipe.read_text()
    with pytest.raises(SystemExit):
        sweep_main([*args[:3], "--name=../x", args[4]])
    assert "name '../x'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "export-best"])
def test_reading_a_study_never_creates_a_database_and_lists_the_studies_there(tmp_path, capsys, command):
    """Issue 27 #8: a mistyped --storage made an empty typo.db and said 'Record does not exist.'; a directory that
    does not exist gave SQLAlchemy's traceback; a wrong --study-name did not list the studies that exist."""
    from gpt2lab.sweep.__main__ import main as sweep_main

    extra = ["--name=best", f"--out={tmp_path / 'conf'}"] if command == "export-best" else []
    for missing in (tmp_path / "typo.db", tmp_path / "no" / "such" / "dir" / "optuna.db"):
        with pytest.raises(SystemExit) as stopped:
            sweep_main([command, f"--storage=sqlite:///{missing}", *extra])
        assert stopped.value.code == 1 and not missing.exists()
        assert capsys.readouterr().err.startswith(f"Error: --storage sqlite:///{missing}: no such file {missing};")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for name in ("lr_search", "width_search"):
        optuna.create_study(study_name=name, storage=storage)
    with pytest.raises(SystemExit):
        sweep_main([command, f"--storage={storage}", "--study-name=lr_serch", *extra])
    assert capsys.readouterr().err == (
        f"Error: --study-name lr_serch: no such study in {storage}; its studies: lr_search, width_search\n"
    )


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
    assert len({t.params["optimizer.lr"] for t in trials}) == 6  # the two workers did not draw the same points


@pytest.mark.slow
def test_pruned_trials_are_pruned_and_failures_are_recorded(train_cli, tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    prune = ["hydra.sweeper.pruner=median", "hydra.sweeper.n_startup_trials=1", "hydra.sweeper.n_warmup_steps=0",
             "hydra.sweeper.n_trials=1", "trainer.max_steps=16"]  # fmt: skip
    # A good trial sets the median; a trial that cannot learn (lr 1e-7) falls behind it at the first report.
    for lr in ("3e-3", "1e-7"):
        run = train_cli(*_sweep_args(corpus_file, cache_dir, sweep, *prune, f"optimizer.lr={lr}"), cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    # A trial that raises (3 heads do not divide width 32) is FAIL with its error; the sweep completes.
    failing = train_cli(
        *_sweep_args(corpus_file, cache_dir, sweep, *prune, "model.num_heads=3", "hydra.sweeper.max_failure_rate=1.0"),
        cwd=tmp_path,
    )
    assert failing.returncode == 0, failing.stderr[-3000:]
    good, pruned, failed = _study(sweep / "optuna.db").trials
    assert (good.state.name, pruned.state.name, failed.state.name) == ("COMPLETE", "PRUNED", "FAIL")
    assert pruned.user_attrs["pruned_at_step"] < 16
    assert "num_heads=3 does not divide" in failed.user_attrs["error"]
    rows = {r["name"]: r["status"] for r in csv.DictReader((sweep / "summary.csv").open())}
    assert rows == {"trial_0": "finished", "trial_1": "pruned", "trial_2": "failed"}


def test_a_sweep_failing_everywhere_stops(train_cli, tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    result = train_cli(
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
def test_grid_sampler_covers_the_grid_once(train_cli, tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    args = _sweep_args(corpus_file, cache_dir, sweep, "hydra.sweeper.n_trials=10")
    (tmp_path / "conf" / "hparams_search" / "grid.yaml").write_text(GRID)
    result = train_cli(*[("hparams_search=grid" if a == "hparams_search=lr_only" else a) for a in args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _study(sweep / "optuna.db").trials
    params = sorted((t.params["optimizer.lr"], t.params["scheduler.warmup_steps"]) for t in trials)
    assert params == [(1e-3, 10), (1e-3, 20), (3e-3, 10), (3e-3, 20)]  # n_trials=10 capped at the grid's 4


SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "grid": optuna.samplers.GridSampler,
}

# A Hydra task as cheap as can be, swept by gpt2lab's Optuna sweeper (hydra/sweeper=gpt2lab_optuna from conf/).
STUDY_TASK = """from pathlib import Path

import hydra

from gpt2lab.config import TRUSTED_TARGETS


def objective(cfg):
    return cfg.x + cfg.y


CONF = str(Path(__file__).parent / "conf")
main = hydra.main(config_path=CONF, config_name="study", execution_whitelist=TRUSTED_TARGETS)(objective)
"""


def test_the_tested_samplers_are_those_the_docs_offer():
    from conftest import REPO

    offered = re.search(
        r"group `hydra/sweeper/sampler`: (.*?), each with `seed`", (REPO / "docs" / "sweeps.md").read_text()
    )
    assert offered and re.findall(r"`(\w+)`", offered.group(1)) == list(SAMPLERS)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_are_selectable(sampler, run_main, tmp_path, monkeypatch):
    """hydra/sweeper/sampler=<name> picks the study's sampler, which proposes three trials that run."""
    from conftest import CONF

    space = "x: choice(0.1, 0.2, 0.3)\n      y: choice(0.4, 0.5)" if sampler == "grid" else (
        "x: interval(0, 1)\n      y: interval(0, 1)"
    )  # fmt: skip
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "study.yaml").write_text(f"""defaults:
  - override hydra/sweeper: gpt2lab_optuna
  - _self_
x: 0.0
y: 0.0
optimized_metric: objective
optuna_trial: null
hydra:
  searchpath: [file://{CONF}]
  sweep:
    dir: sweep
    subdir: trial_${{optuna_trial}}
  sweeper:
    study_name: t
    n_trials: 3
    sampler:
      seed: 0
    params:
      {space}
""")
    (tmp_path / f"study_{sampler}.py").write_text(STUDY_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    studies = []
    create_study = optuna.create_study
    monkeypatch.setattr(optuna, "create_study", lambda **kw: studies.append(create_study(**kw)) or studies[-1])
    try:
        result = run_main(f"study_{sampler}", "-m", f"hydra/sweeper/sampler={sampler}", cwd=tmp_path)
    finally:
        sys.modules.pop(f"study_{sampler}", None)
    assert result.returncode == 0, result.stderr[-3000:]
    (study,) = studies
    assert type(study.sampler) is SAMPLERS[sampler]
    assert "seed" in sampler_config(sampler)  # as hparams_search=optuna composes it: seeded
    trials = _study(tmp_path / "sweep" / "optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(t.value == pytest.approx(t.params["x"] + t.params["y"]) for t in trials)  # the task ran with them
    assert len({(t.params["x"], t.params["y"]) for t in trials}) == 3


# The Optuna sweeper's bookkeeping, driven in-process by stand-in jobs that return a value instead of training.


def sampler_config(name: str) -> DictConfig:
    """``hydra/sweeper/sampler=<name>`` of ``hparams_search=optuna``, resolved as Hydra hands it to the sweeper."""
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from gpt2lab.config import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(
            "train", overrides=["hparams_search=optuna", f"hydra/sweeper/sampler={name}"], return_hydra_config=True
        )
    return OmegaConf.create(OmegaConf.to_container(cfg.hydra.sweeper.sampler, resolve=True))


class StandInLauncher:
    """Launches each job as a call of ``job(params)``, a value or an exception, and shows the result to the summary
    callback as Hydra's ``run_job`` would."""

    def __init__(self, sweep_dir: Path, job: Callable[[dict[str, str]], Any]) -> None:
        self.sweep_dir, self.job = sweep_dir, job

    def launch(self, job_overrides: list[tuple[str, ...]], initial_job_idx: int) -> list[JobReturn]:
        returns = []
        for overrides in job_overrides:
            params = dict(o.split("=", 1) for o in overrides)
            run_dir = self.sweep_dir / f"trial_{params['optuna_trial']}"
            run_dir.mkdir(parents=True)
            hydra = {
                "mode": RunMode.MULTIRUN,
                "sweep": {"dir": str(self.sweep_dir)},
                "runtime": {"output_dir": str(run_dir)},
            }
            cfg = OmegaConf.create({"optimized_metric": "val/loss", "hydra": hydra})
            try:
                ret = JobReturn(list(overrides), cfg, cfg, status=JobStatus.COMPLETED, _return_value=self.job(params))
            except Exception as e:
                ret = JobReturn(list(overrides), cfg, cfg, status=JobStatus.FAILED, _return_value=e)
            SweepSummary().on_job_end(cfg, ret)
            returns.append(ret)
        return returns


def stand_in_sweep(
    sweep_dir: Path, sampler: DictConfig, params: dict[str, str], job: Callable, n_trials: int = 2, **kwargs: Any
) -> None:
    """One invocation of ``python train.py -m`` with gpt2lab's Optuna sweeper on study ``t`` in ``sweep_dir``."""
    sweeper = OptunaSweeper(sampler, study_name="t", n_trials=n_trials, params=OmegaConf.create(params), **kwargs)
    sweeper.config = OmegaConf.create({"optimized_metric": "val/loss", "hydra": {"sweep": {"dir": str(sweep_dir)}}})
    sweeper.launcher = StandInLauncher(sweep_dir, job)
    sweeper.sweep([])


XY = {"x": "interval(0, 1)", "y": "interval(0, 1)"}


def objective(params: dict[str, str]) -> float:
    return float(params["x"]) + float(params["y"])


def proposed(sweep_dir: Path) -> list[tuple[str, ...]]:
    return [tuple(str(v) for v in t.params.values()) for t in _study(sweep_dir / "optuna.db").trials]


@pytest.mark.parametrize(
    ("sampler", "params"),
    [("tpe", XY), ("random", XY), ("grid", {"x": "choice(1, 2, 3)", "y": "choice(1, 2)"})],
)
def test_a_continued_study_proposes_new_points_and_a_seeded_study_is_reproducible(tmp_path, sampler, params):
    config = sampler_config(sampler)
    assert config.seed == 1234
    for study in ("a", "b"):  # the same command twice on each of two studies
        for _ in range(2):
            stand_in_sweep(tmp_path / study, config, params, objective)
    points = proposed(tmp_path / "a")
    assert len(points) == 4 and len(set(points)) == 4  # the second invocation did not start the sequence again
    assert proposed(tmp_path / "b") == points  # the same seed and the same history: the same points


def test_a_worker_joining_a_running_study_proposes_other_points(tmp_path):
    sweep, config = tmp_path / "study", sampler_config("tpe")
    joined = []

    def first_workers_job(params):
        if not joined:  # while the first worker's first trial runs, a second worker starts on the study
            joined.append(True)
            # No heartbeat: in this process it would wait for the first worker's trial, which waits for it.
            stand_in_sweep(sweep, config, XY, objective, n_trials=1, heartbeat_interval=None)
        return objective(params)

    stand_in_sweep(sweep, config, XY, first_workers_job, n_trials=2)
    points = proposed(sweep)
    assert len(points) == 3 and len(set(points)) == 3


def test_the_summary_and_the_study_agree_on_each_jobs_outcome(tmp_path):
    sweep = tmp_path / "study"
    outcomes = iter([0.5, None, float("nan"), float("inf"), optuna.TrialPruned("pruned at step 4"), ValueError("boom")])

    def job(params):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    stand_in_sweep(sweep, sampler_config("random"), XY, job, n_trials=6, max_failure_rate=1.0)
    trials = _study(sweep / "optuna.db").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "FAIL", "PRUNED", "FAIL"]
    rows = {r["name"]: r for r in csv.DictReader((sweep / "summary.csv").open())}
    status = {"COMPLETE": "finished", "FAIL": "failed", "PRUNED": "pruned"}
    for t in trials:
        row = rows[f"trial_{t.number}"]
        assert row["status"] == status[t.state.name], row
        assert row["objective"] == ("" if t.value is None else str(t.value)), row
        if t.state.name == "FAIL":
            assert row["error"] == t.user_attrs["error"]
    assert rows["trial_2"]["error"] == "the objective (val/loss) is nan, not a finite number"
    assert rows["trial_4"]["error"] == "TrialPruned: pruned at step 4"
    assert rows["trial_5"]["error"] == "ValueError: boom"
