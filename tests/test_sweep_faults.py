"""Sweeps that lose nothing: a worker killed mid-trial, workers sharing one SQLite study, a trial out of memory."""

import signal
import weakref

import optuna
import pytest
from conftest import start_cli
from helpers import OutOfMemoryAtStep
from hydra.utils import execution_whitelist
from test_sweep import XY, _study, _sweep_args, objective, sampler_config, stand_in_sweep

from gpt2lab.errors import ConfigError
from gpt2lab.sweep.optuna_sweeper import OptunaSweeper
from gpt2lab.sweep.studies import open_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # heartbeats and retries
FINISHED = ("COMPLETE", "PRUNED")
RETRY = optuna.storages.RetryHeartbeatStaleTrialCallback


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # this test's own ask
def test_a_dead_workers_trial_is_failed_and_rerun_with_its_parameters(tmp_path):
    sweep, url = tmp_path / "study", f"sqlite:///{tmp_path / 'study' / 'optuna.db'}"
    sweep.mkdir()
    # A worker that asked for a trial, beat once and died: its trial is RUNNING with a heartbeat that ages.
    storage = open_storage(url, heartbeat_interval=1, grace_period=2)
    trial = optuna.create_study(study_name="t", storage=storage).ask()
    x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
    trial.set_user_attr("heartbeat_interval", 1)
    storage.record_heartbeat(trial._trial_id)
    jobs = {}

    def job(params):
        jobs[int(params["optuna_trial"])] = params
        return objective(params)

    # Another worker runs its own two trials and, before it finishes, fails the dead one's and re-runs it.
    stand_in_sweep(sweep, sampler_config("random"), XY, job, n_trials=2, heartbeat_interval=1, grace_period=2)
    trials = _study(sweep / "optuna.db").trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE"] * 3 + ["FAIL"]
    assert trials[0].state.name == "FAIL"
    (retry,) = [t for t in trials if "failed_trial" in t.system_attrs]
    assert RETRY.retried_trial_number(retry) == 0 and retry.state.name == "COMPLETE"
    assert retry.params == {"x": x, "y": y}
    assert (float(jobs[retry.number]["x"]), float(jobs[retry.number]["y"])) == (x, y)  # its job's overrides


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ({"heartbeat_interval": 0}, "hydra.sweeper.heartbeat_interval=0: expected a whole number of seconds"),
        ({"heartbeat_interval": 60, "grace_period": 30}, "grace_period=30 is not longer than heartbeat_interval=60"),
        ({"max_retry": -1}, "hydra.sweeper.max_retry=-1"),
        ({"n_trials_per": "worker"}, "hydra.sweeper.n_trials_per='worker': expected one of invocation, study"),
    ],
)
def test_bad_heartbeat_fields_are_refused(field, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        OptunaSweeper(sampler_config("random"), **field)


@pytest.mark.slow
def test_a_sweep_worker_killed_mid_trial_loses_no_trial(tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    shared = ["hydra.sweeper.n_trials=4", "hydra.sweeper.n_trials_per=study", "hydra.sweeper.heartbeat_interval=1",
              "hydra.sweeper.grace_period=10", "trainer.max_steps=6", "trainer.val_check_interval=3"]  # fmt: skip
    survivor = start_cli(
        *_sweep_args(corpus_file, cache_dir, sweep, *shared), cwd=tmp_path, output=tmp_path / "survivor.log"
    )
    kill = ["+callbacks.kill._target_=helpers.KillAtStep", "+callbacks.kill.step=3"]  # SIGKILL in its first trial
    killed = start_cli(
        *_sweep_args(corpus_file, cache_dir, sweep, *shared, *kill), cwd=tmp_path, output=tmp_path / "killed.log"
    )
    assert killed.wait(timeout=600) == -signal.SIGKILL
    assert survivor.wait(timeout=600) == 0, (tmp_path / "survivor.log").read_text()[-3000:]

    trials = _study(sweep / "optuna.db").trials
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states
    assert sum(s in FINISHED for s in states) == 4  # every requested trial
    (lost,) = [t for t in trials if t.state.name == "FAIL"]
    (retry,) = [t for t in trials if "failed_trial" in t.system_attrs]
    assert RETRY.retried_trial_number(retry) == lost.number
    assert retry.state.name in FINISHED and retry.params == lost.params
    assert lost.user_attrs["worker"].endswith(f":{killed.pid}") and retry.user_attrs["worker"].endswith(
        f":{survivor.pid}"
    )
    assert f"optimizer.lr={lost.params['optimizer.lr']}" in retry.user_attrs["overrides"]
    assert (sweep / f"trial_{retry.number}" / "results.json").is_file()
    assert f"Trial {retry.number} re-runs trial {lost.number}" in (tmp_path / "survivor.log").read_text()


@pytest.mark.slow
def test_four_workers_on_one_sqlite_study_record_every_trial(tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    short = ["hydra.sweeper.n_trials=5", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.pruner=median",
             "hydra.sweeper.n_startup_trials=1", "trainer.max_steps=2", "trainer.val_check_interval=1",
             "trainer.limit_val_batches=1"]  # fmt: skip  # heartbeats and pruning reports: many writes at once
    args = _sweep_args(corpus_file, cache_dir, sweep, *short)
    workers = [start_cli(*args, cwd=tmp_path, output=tmp_path / f"worker{i}.log") for i in range(4)]
    for i, w in enumerate(workers):
        assert w.wait(timeout=900) == 0, (tmp_path / f"worker{i}.log").read_text()[-3000:]
    trials = _study(sweep / "optuna.db").trials
    assert sorted(t.number for t in trials) == list(range(20))
    assert all(t.state.name in FINISHED for t in trials), [(t.number, t.state.name, t.user_attrs) for t in trials]
    logs = "".join((tmp_path / f"worker{i}.log").read_text() for i in range(4))
    assert "database is locked" not in logs


class OutOfMemoryInFirstTrial(OutOfMemoryAtStep):
    """``OutOfMemoryAtStep`` in the first trial of an in-process sweep only; as each trial starts to fit, notes how
    many earlier trials' modules are still alive."""

    modules: list[weakref.ref] = []
    alive_at_start: list[int] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.alive_at_start.append(sum(m() is not None for m in self.modules))
        self.modules.append(weakref.ref(pl_module))

    def on_train_batch_end(self, trainer, *args) -> None:
        if len(self.modules) == 1:
            super().on_train_batch_end(trainer, *args)


def test_a_trial_out_of_memory_fails_alone_and_frees_its_model(train_cli, tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    oom = ["+callbacks.oom._target_=test_sweep_faults.OutOfMemoryInFirstTrial", "+callbacks.oom.step=1",
           "hydra.sweeper.n_trials=2", "hydra.sweeper.max_failure_rate=1.0", "trainer.max_steps=2",
           "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "validate_at_start=false"]  # fmt: skip
    OutOfMemoryInFirstTrial.modules.clear()
    OutOfMemoryInFirstTrial.alive_at_start.clear()
    with execution_whitelist("test_sweep_faults.*"):
        result = train_cli(*_sweep_args(corpus_file, cache_dir, sweep, *oom), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = _study(sweep / "optuna.db").trials
    assert (first.state.name, second.state.name) == ("FAIL", "COMPLETE")
    assert first.user_attrs["error"].startswith("ConfigError: out of GPU memory")
    assert OutOfMemoryInFirstTrial.alive_at_start == [0, 0]  # the failed trial's model was gone when the next began


def test_n_trials_per_study_tops_the_study_up_and_a_failed_trial_is_not_rerun(tmp_path):
    sweep, config = tmp_path / "study", sampler_config("random")
    outcomes = iter([0.5, ValueError("boom"), 0.7])

    def fails_once(params):
        outcome = next(outcomes, 0.9)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    study = {"n_trials": 3, "n_trials_per": "study", "max_failure_rate": 1.0}
    stand_in_sweep(sweep, config, XY, fails_once, **study)
    assert [t.state.name for t in _study(sweep / "optuna.db").trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    stand_in_sweep(sweep, config, XY, fails_once, **study)  # the same command again: the study is full
    assert len(_study(sweep / "optuna.db").trials) == 4
    stand_in_sweep(sweep, config, XY, fails_once, n_trials=2)  # n_trials_per=invocation adds its n_trials
    assert len(_study(sweep / "optuna.db").trials) == 6


def test_a_worker_stopped_by_ctrl_c_hands_its_trial_back(tmp_path):
    sweep, config = tmp_path / "study", sampler_config("random")

    def interrupted(params):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stand_in_sweep(sweep, config, XY, interrupted, n_trials=1)
    stopped, queued = _study(sweep / "optuna.db").trials
    assert (stopped.state.name, queued.state.name) == ("FAIL", "WAITING")
    assert queued.params == stopped.params and queued.system_attrs["failed_trial"] == stopped.number
    stand_in_sweep(sweep, config, XY, objective, n_trials=1)  # the same command again: the stopped trial first
    trials = _study(sweep / "optuna.db").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == stopped.params


def test_a_trial_failed_by_another_worker_while_it_ran_is_left_to_its_retry(tmp_path, caplog):
    sweep = tmp_path / "study"

    def taken_for_dead(params):  # as another worker does when this one's heartbeat stops for grace_period
        storage = open_storage(f"sqlite:///{sweep / 'optuna.db'}")
        trial = _study(sweep / "optuna.db").trials[int(params["optuna_trial"])]
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return objective(params)

    stand_in_sweep(sweep, sampler_config("random"), XY, taken_for_dead, n_trials=1)
    assert [t.state.name for t in _study(sweep / "optuna.db").trials] == ["FAIL"]
    assert "Trial 0 was failed by another worker while it ran here" in caplog.text


def test_a_preempted_sweep_worker_hands_its_trial_back(train_cli, tmp_path, corpus_file, cache_dir):
    sweep = tmp_path / "study"
    stop = ["+callbacks.stop._target_=helpers.SignalAtStep", "+callbacks.stop.step=2", "hydra.sweeper.n_trials=2",
            "validate_at_start=false"]  # fmt: skip  # SIGTERM, as a cluster preempting the job
    result = train_cli(*_sweep_args(corpus_file, cache_dir, sweep, *stop), cwd=tmp_path)
    assert result.returncode == 143, result.stderr[-3000:]
    stopped, queued = _study(sweep / "optuna.db").trials
    assert (stopped.state.name, queued.state.name) == ("FAIL", "WAITING")
    assert queued.params == stopped.params and queued.system_attrs["failed_trial"] == 0
    assert (sweep / "trial_0" / "checkpoints" / "last.ckpt").is_file()
