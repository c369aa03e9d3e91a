"""Optuna sweeps: the stock Hydra sweeper, plus what a research team needs from it.

``OptunaSweeper`` subclasses ``hydra-optuna-sweeper``'s implementation and keeps its search-space
parsing and trial configuration; its ``sweep`` loop adds
- an SQLite storage in the sweep directory by default, so a study survives its process and several
  workers can share it (any SQLAlchemy URL works through ``hydra.sweeper.storage``);
- a continued study, or a worker joining one, proposes new points: the sampler's seed is offset by the trials
  already in the study, so a seeded sampler does not start its sequence again (a fresh study stays reproducible);
- the trial number handed to each job (``optuna_trial``), so that ``OptunaPruning`` can report validation
  losses and stop a trial the pruner gives up on; such trials are recorded as PRUNED, not FAIL;
- a worker that dies mid-trial (killed, preempted, its machine lost) loses nothing: each worker records a heartbeat
  for its trials, a trial whose heartbeat stops is failed by the next worker that asks for a trial and re-run
  with the same parameters (``heartbeat_interval``, ``grace_period``, ``max_retry``; a worker stopped by SIGTERM or
  Ctrl-C queues its trial again at once), and a worker that is done waits for the others' running trials, to
  re-run them if their worker dies; with ``n_trials_per=study`` the workers together fill the study to
  ``n_trials``, a dead worker's share included;
- after each job, the memory its model held is freed (a failed job's traceback no longer keeps it), so a trial
  that ran out of GPU memory leaves the GPU to the next;
- failures recorded as FAIL with their error while the study goes on (a job that returns no finite objective
  fails too; ``gpt2lab.sweep.summary.job_outcome`` decides, for the study and the sweep's summary table alike),
  and
  ``max_failure_rate`` measured over the whole sweep;
- ``optimization_results.yaml`` and PNG plots (history, parameter importances) in the sweep directory.

The study's storage, results and reading back (``export_best``, ``report``) are ``gpt2lab.sweep.studies``.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from gpt2lab.errors import ConfigError
from gpt2lab.secrets import MASK, is_secret_key, redact
from gpt2lab.sweep.studies import default_storage, hand_back, heartbeat, open_storage, retried_from, save_results, tell
from gpt2lab.sweep.summary import job_outcome

log = logging.getLogger(__name__)
PRUNERS = ("none", "median", "hyperband")
N_TRIALS_PER = ("invocation", "study")
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # recorded with each trial this process runs


def make_pruner(pruner: str, n_startup_trials: int = 5, n_warmup_steps: int = 0) -> optuna.pruners.BasePruner:
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"hydra.sweeper.pruner={pruner!r}: expected one of {', '.join(PRUNERS)}")


def release_memory(returns: list[JobReturn]) -> None:
    """Free what the jobs' models held before the next trial starts. A failed job's exception keeps its traceback,
    and the traceback the frames of ``train`` with their locals (model, optimizer, trainer): a trial that ran out of
    GPU memory would leave the memory taken for the next. Clear those frames, collect the reference cycles
    (module and trainer point at each other) and hand PyTorch's cached GPU blocks back."""
    for ret in returns:
        errors = [ret._return_value] if ret.status == JobStatus.FAILED else []
        seen: set[int] = set()
        while errors:
            error = errors.pop()
            if not isinstance(error, BaseException) or id(error) in seen:
                continue
            seen.add(id(error))
            if error.__traceback__ is not None:
                traceback.clear_frames(error.__traceback__)
                error.__traceback__ = None
            errors += [error.__cause__, error.__context__]
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class OptunaSweeper(OptunaSweeperImpl):
    """``hydra/sweeper=gpt2lab_optuna``: see the module docstring."""

    def __init__(
        self,
        sampler: Any,
        direction: Any = "minimize",
        storage: str | None = None,
        study_name: str | None = None,
        n_trials: int = 20,
        n_trials_per: str = "invocation",
        n_jobs: int = 1,
        timeout: float | None = None,
        max_failure_rate: float = 0.5,
        pruner: str = "none",
        n_startup_trials: int = 5,
        n_warmup_steps: int = 0,
        heartbeat_interval: int | None = 60,
        grace_period: int | None = None,
        max_retry: int | None = 3,
        params: DictConfig | None = None,
        custom_search_space: str | None = None,
    ) -> None:
        super().__init__(
            _instantiate_sampler(sampler), direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
            custom_search_space, params,
        )  # fmt: skip
        if n_trials_per not in N_TRIALS_PER:
            raise ConfigError(f"hydra.sweeper.n_trials_per={n_trials_per!r}: expected one of {', '.join(N_TRIALS_PER)}")
        for key, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"hydra.sweeper.{key}={value!r}: expected a whole number of seconds > 0, or null")
        if heartbeat_interval and grace_period is not None and grace_period <= heartbeat_interval:
            raise ConfigError(
                f"hydra.sweeper.grace_period={grace_period} is not longer than heartbeat_interval={heartbeat_interval}:"
                " live trials would be taken for dead ones; make it a few heartbeats long (null: two)"
            )
        if max_retry is not None and (not isinstance(max_retry, int) or max_retry < 0):
            raise ConfigError(
                f"hydra.sweeper.max_retry={max_retry!r}: expected a whole number >= 0, or null (no limit)"
            )
        self.sampler_config = sampler  # instantiated again, with another seed, to continue a study
        self.n_trials_per = n_trials_per
        self.timeout = timeout
        self.pruner = make_pruner(pruner, n_startup_trials, n_warmup_steps)
        self.heartbeat_interval, self.grace_period, self.max_retry = heartbeat_interval, grace_period, max_retry

    def sweep(self, arguments: list[str]) -> None:
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        url = self.storage or default_storage(sweep_dir)
        self._process_searchspace_config()
        space, fixed_params, fixed_overrides = create_params_from_overrides(
            [*self._parse_sweeper_params_config(), *arguments]
        )
        for name in fixed_params:
            space.pop(name, None)
        grid = None
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))

        deadline = time.time() + self.timeout if self.timeout else math.inf
        # Workers started together would race to create the SQLite schema, and would count the same trials and
        # so draw the same points; a file lock orders them, and each asks its trials before the next one counts.
        # The lock lives in the sweep directory: workers on machines that do not share it must not start at the
        # same moment with the same seed, and with n_trials_per=study they may overshoot n_trials by a trial or so.
        lock = FileLock(str(sweep_dir / ".optuna.lock"))
        with lock:
            storage = open_storage(url, self.heartbeat_interval, self.grace_period, self.max_retry)
            study = optuna.create_study(
                study_name=self.study_name, storage=storage, sampler=self._sampler(grid), pruner=self.pruner,
                directions=self._get_directions(), load_if_exists=True,
            )  # fmt: skip
            log.info("Study %s in %s: %d trials so far", study.study_name, url, len(study.trials))
            if study.trials:
                study.sampler = self._sampler(grid, seed_offset=len(study.trials))
            # Asked under the same lock: a worker that counted the trials must add its own before the next one
            # counts, or both would seed their samplers alike and draw the same first points.
            trials: list[optuna.trial.Trial] | None = self._ask(study, storage, 0, deadline)
        own = done = failed = 0  # own: the trials this worker added (not the retries it ran)
        others: set[int] | None = None  # when this worker is done: the other workers' trials it waits for
        while True:
            if trials is None:
                with lock:
                    trials = self._ask(study, storage, own, deadline)
            if not trials:
                others = self._others_running(study, deadline, others)
                if not others:
                    break
                time.sleep(min(self.heartbeat_interval, 10))
                trials = None
                continue
            own += sum(retried_from(storage, t) is None for t in trials)
            overrides = self._configure_trials(trials, space, fixed_params, fixed_overrides)
            overrides = [(*o, f"optuna_trial={t.number}") for o, t in zip(overrides, trials, strict=True)]
            for trial, trial_overrides in zip(trials, overrides, strict=True):
                trial.set_user_attr("overrides", [redact(o) for o in trial_overrides])  # known even if this worker dies
                trial.set_user_attr("worker", WORKER)
                if self.heartbeat_interval:  # so that the others wait for it: it is reaped if this worker dies
                    trial.set_user_attr("heartbeat_interval", self.heartbeat_interval)
            try:
                with heartbeat(storage, [t._trial_id for t in trials]):
                    returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM (train.py's preemption): hand the trials back
                hand_back(study, storage, trials)
                raise
            self.job_idx += len(returns)
            failed += self._record(study, trials, returns)
            done += len(returns)
            release_memory(returns)
            trials = returns = None
            if failed / done > self.max_failure_rate and done >= min(self.n_trials, 4):
                first = next(t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error"))
                save_results(study, sweep_dir)
                print(
                    f"\nError: {failed} of {done} trials failed (hydra.sweeper.max_failure_rate={self.max_failure_rate}); "
                    f"stopping the sweep. The first failure: {first}\nEach failed job's log is under {sweep_dir}.",
                    file=sys.stderr,
                )
                raise SystemExit(1)
        save_results(study, sweep_dir)

    def _configure_trials(
        self, trials: list[optuna.trial.Trial], space: dict[str, Any], fixed_params: dict[str, Any], fixed: list[str]
    ) -> list[list[str]]:
        """The trials' overrides, as Optuna's sweeper makes them. It would record each fixed value as a user
        attribute of the trial, in the study's storage (the SQLite file in the sweep directory by default): the
        values are given to it as fixed overrides instead (the same overrides, in the same order), and recorded
        here with secrets masked, as in the files beside it, so a secret never reaches the storage. The jobs get
        the real values."""
        as_overrides = [f"{name}={value}" for name, value in fixed_params.items()]
        overrides = super()._configure_trials(trials, space, {}, [*as_overrides, *fixed])
        for trial in trials:
            for name, value in fixed_params.items():
                trial.set_user_attr(name, MASK if is_secret_key(name) else redact(value))
        return overrides

    def _ask(
        self, study: optuna.Study, storage: optuna.storages.RDBStorage, own: int, deadline: float
    ) -> list[optuna.trial.Trial]:
        """This worker's next trials. First the RUNNING trials of dead workers (no heartbeat for ``grace_period``)
        are failed, which queues their retries; ``study.ask`` hands out queued trials before new ones. New trials
        fill ``n_trials``: this invocation's, or the study's (COMPLETE, PRUNED, RUNNING and queued trials)."""
        if time.time() >= deadline:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        waiting = states.count(TrialState.WAITING)
        if self.n_trials_per == "study":
            new = self.n_trials - sum(map(states.count, (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)))
            new -= waiting
        else:
            new = self.n_trials - own
        trials = []
        for _ in range(min(self.n_jobs, max(new, 0) + waiting)):
            with warnings.catch_warnings():  # Optuna expects heartbeats with study.optimize; this loop keeps them
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                trial = study.ask()
            if self.heartbeat_interval:  # at once: a worker killed before its job starts leaves a trial to reap
                storage.record_heartbeat(trial._trial_id)
            retry = retried_from(storage, trial)
            if retry is not None:
                log.info("Trial %d re-runs trial %d, whose worker stopped", trial.number, retry)
            trials.append(trial)
        return trials

    def _others_running(self, study: optuna.Study, deadline: float, waiting_for: set[int] | None) -> set[int]:
        """The other workers' trials this worker waits for before it finishes: those RUNNING when it ran out of
        trials of its own, with a heartbeat. If their worker has died, this worker fails them once their heartbeat
        is ``grace_period`` old and runs their retries, so that a sweep ends with no trial left RUNNING."""
        if not self.heartbeat_interval or time.time() >= deadline:
            return set()
        running = {
            t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("heartbeat_interval")
        }
        if waiting_for is None:
            if running:
                log.info("Waiting for trials %s of other workers to end (a worker that died leaves them to this one)",
                         sorted(running))  # fmt: skip
            return running
        return running & waiting_for

    def _record(self, study: optuna.Study, trials: list[optuna.trial.Trial], returns: list[JobReturn]) -> int:
        """Tell the study how each job ended (see ``job_outcome``); return how many failed."""
        failed = 0
        for trial, ret in zip(trials, returns, strict=True):
            run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else None
            outcome = job_outcome(ret, self.config.optimized_metric)
            try:
                trial.set_user_attr("run_dir", str(run_dir or ""))
                if run_dir is not None and (run_dir / "results.json").is_file():
                    trial.set_user_attr("steps", json.loads((run_dir / "results.json").read_text())["global_step"])
                if outcome.status == "finished":
                    tell(study, trial, values=[outcome.objective])
                elif outcome.status == "pruned":
                    tell(study, trial, state=TrialState.PRUNED)
                else:
                    trial.set_user_attr("error", redact(outcome.error)[:1000])
                    tell(study, trial, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                log.warning(
                    "Trial %d was failed by another worker while it ran here (no heartbeat for longer than "
                    "hydra.sweeper.grace_period): its retry counts, not this result",
                    trial.number,
                )
                continue
            if outcome.status == "failed":
                log.warning("Trial %d failed: %s", trial.number, outcome.error)
                failed += 1
        return failed

    def _sampler(self, grid: dict[str, list[Any]] | None, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        """The configured sampler, its seed (if it has one) plus ``seed_offset``: a study continued with the seed
        it was started with would draw the points it has already tried. Not the grid sampler's: its seed shuffles
        the grid, and trial n takes the n-th point, so the whole study must walk one order."""
        config = self.sampler_config
        if seed_offset and grid is None and config.get("seed") is not None:
            config = OmegaConf.merge(config, {"seed": config["seed"] + seed_offset})
        sampler = _instantiate_sampler(config)
        return sampler(grid) if grid is not None else sampler


def _instantiate_sampler(config: Any) -> Any:
    """A sampler from ``hydra/sweeper/sampler``; the grid sampler comes as a partial, waiting for its grid."""
    return instantiate(config, _execution_whitelist_=("optuna.samplers.*", "hydra_plugins.hydra_optuna_sweeper.*"))


class OptunaPruning(pl.Callback):
    """Reports ``monitor`` to the job's Optuna trial at each validation and stops the trial when the
    sweeper's pruner says so. Added by the trainer script when the sweeper set ``optuna_trial``. Under
    DDP only rank 0 talks to the study; its decision is broadcast so that every rank stops together."""

    def __init__(self, trial_number: int, monitor: str = "val/loss") -> None:
        self.trial_number = trial_number
        self.monitor = monitor
        self.trial: optuna.trial.Trial | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.trial is None:
            sweeper = HydraConfig.get().sweeper
            storage = open_storage(sweeper.get("storage") or default_storage(HydraConfig.get().sweep.dir))
            pruner = make_pruner(
                sweeper.get("pruner", "none"), sweeper.get("n_startup_trials", 5), sweeper.get("n_warmup_steps", 0)
            )
            study = optuna.load_study(study_name=sweeper.study_name, storage=storage, pruner=pruner)
            self.trial = optuna.trial.Trial(study, study.trials[self.trial_number]._trial_id)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.monitor not in trainer.callback_metrics:
            return
        step, value = trainer.global_step, float(trainer.callback_metrics[self.monitor])
        prune = False
        if self.trial is not None:
            self.trial.report(value, step)
            prune = self.trial.should_prune()
            if prune:
                self.trial.set_user_attr("pruned_at_step", step)
        if trainer.strategy.broadcast(prune, src=0):
            raise optuna.TrialPruned(f"pruned at step {step} with {self.monitor}={value:.4f}")
