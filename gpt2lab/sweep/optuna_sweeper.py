"""Optuna sweeps: the stock Hydra sweeper, plus what a research team needs from it.

``OptunaSweeper`` subclasses ``hydra-optuna-sweeper``'s implementation and keeps its search-space
parsing and trial configuration; its ``sweep`` loop adds
- an SQLite storage in the sweep directory by default, so a study survives its process and several
  workers can share it (any SQLAlchemy URL works through ``hydra.sweeper.storage``);
- a continued study, or a worker joining one, proposes new points: the sampler's seed is offset by the trials
  already in the study, so a seeded sampler does not start its sequence again (a fresh study stays reproducible);
- the trial number handed to each job (``optuna_trial``), so that ``OptunaPruning`` can report validation
  losses and stop a trial the pruner gives up on; such trials are recorded as PRUNED, not FAIL;
- failures recorded as FAIL with their error while the study goes on (a job that returns no finite objective
  fails too; ``gpt2lab.sweep.summary.job_outcome`` decides, for the study and the sweep's summary table alike),
  and
  ``max_failure_rate`` measured over the whole sweep;
- ``optimization_results.yaml`` and PNG plots (history, parameter importances) in the sweep directory.

``export_best`` turns the best trial into an ``experiment/`` config and ``report`` lists the trials with the steps
each trained: ``python -m gpt2lab.sweep export-best|report``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf

from gpt2lab.config import config_groups
from gpt2lab.errors import ConfigError
from gpt2lab.sweep.summary import job_outcome

log = logging.getLogger(__name__)
PRUNERS = ("none", "median", "hyperband")


def make_pruner(pruner: str, n_startup_trials: int = 5, n_warmup_steps: int = 0) -> optuna.pruners.BasePruner:
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=n_warmup_steps)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"hydra.sweeper.pruner={pruner!r}: expected one of {', '.join(PRUNERS)}")


def default_storage(sweep_dir: str | Path) -> str:
    return f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


class OptunaSweeper(OptunaSweeperImpl):
    """``hydra/sweeper=gpt2lab_optuna``: see the module docstring."""

    def __init__(
        self,
        sampler: Any,
        direction: Any = "minimize",
        storage: str | None = None,
        study_name: str | None = None,
        n_trials: int = 20,
        n_jobs: int = 1,
        timeout: float | None = None,
        max_failure_rate: float = 0.5,
        pruner: str = "none",
        n_startup_trials: int = 5,
        n_warmup_steps: int = 0,
        params: DictConfig | None = None,
        custom_search_space: str | None = None,
    ) -> None:
        super().__init__(
            _instantiate_sampler(sampler), direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
            custom_search_space, params,
        )  # fmt: skip
        self.sampler_config = sampler  # instantiated again, with another seed, to continue a study
        self.timeout = timeout
        self.pruner = make_pruner(pruner, n_startup_trials, n_warmup_steps)

    def sweep(self, arguments: list[str]) -> None:
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        storage = self.storage or default_storage(sweep_dir)
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
        # so draw the same points; a file lock orders them, and each asks its first trials before the next one
        # counts. The lock lives in the sweep directory: workers on machines that do not share it must not start
        # at the same moment with the same seed.
        with FileLock(str(sweep_dir / ".optuna.lock")):
            study = optuna.create_study(
                study_name=self.study_name, storage=storage, sampler=self._sampler(grid), pruner=self.pruner,
                directions=self._get_directions(), load_if_exists=True,
            )  # fmt: skip
            log.info("Study %s in %s: %d trials so far", study.study_name, storage, len(study.trials))
            if study.trials:
                study.sampler = self._sampler(grid, seed_offset=len(study.trials))
            trials = [study.ask() for _ in range(min(self.n_jobs, self.n_trials))]
        done = failed = 0
        while trials:
            overrides = self._configure_trials(trials, space, fixed_params, fixed_overrides)
            overrides = [(*o, f"optuna_trial={t.number}") for o, t in zip(overrides, trials, strict=True)]
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else None
                trial.set_user_attr("overrides", list(ret.overrides or []))
                trial.set_user_attr("run_dir", str(run_dir or ""))
                if run_dir is not None and (run_dir / "results.json").is_file():
                    trial.set_user_attr("steps", json.loads((run_dir / "results.json").read_text())["global_step"])
                outcome = job_outcome(ret, self.config.optimized_metric)
                if outcome.status == "finished":
                    _tell(study, trial, values=[outcome.objective])
                elif outcome.status == "pruned":
                    _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    trial.set_user_attr("error", outcome.error[:1000])
                    _tell(study, trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("Trial %d failed: %s", trial.number, outcome.error)
                    failed += 1
            done += len(returns)
            if failed / done > self.max_failure_rate and done >= min(self.n_trials, 4):
                first = next(t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error"))
                save_results(study, sweep_dir)
                print(
                    f"\nError: {failed} of {done} trials failed (hydra.sweeper.max_failure_rate={self.max_failure_rate}); "
                    f"stopping the sweep. The first failure: {first}\nEach failed job's log is under {sweep_dir}.",
                    file=sys.stderr,
                )
                raise SystemExit(1)
            left = self.n_trials - done if time.time() < deadline else 0
            trials = [study.ask() for _ in range(min(self.n_jobs, left))]
        save_results(study, sweep_dir)

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


def _tell(study: optuna.Study, trial: optuna.trial.Trial, **kwargs: Any) -> None:
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as e:  # GridSampler calls study.stop() once the grid is done, which Optuna
        if "Study.stop" not in str(e):  # only allows inside an objective; the trial is recorded anyway
            raise


def save_results(study: optuna.Study, sweep_dir: Path) -> None:
    """``optimization_results.yaml`` with the best trial, and PNG plots of the study."""
    states = [t.state.name for t in study.trials]
    counts = {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")}
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    results: dict[str, Any] = {"name": "optuna", "study_name": study.study_name, "trials": counts}
    if completed:
        best = study.best_trial
        results |= {"best_value": best.value, "best_params": best.params, "best_trial": best.number,
                    "best_run_dir": best.user_attrs.get("run_dir")}  # fmt: skip
        log.info("Best value %s with %s (trial %d, %s)", best.value, best.params, best.number, results["best_run_dir"])
    log.info("Trials: %s", counts)
    OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")
    if len(completed) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    for name, plot in (
        ("optimization_history", ov.plot_optimization_history),
        ("param_importances", ov.plot_param_importances),
    ):
        try:
            plot(study).figure.savefig(sweep_dir / f"{name}.png", dpi=100, bbox_inches="tight")
        except (ValueError, RuntimeError) as e:  # e.g. importances need two or more varied parameters
            log.warning("No %s plot: %s", name, e)
        plt.close("all")


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
            storage = sweeper.get("storage") or default_storage(HydraConfig.get().sweep.dir)
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


def export_best(storage: str, study_name: str, name: str, out_dir: Path) -> Path:
    """Write the best trial's overrides as ``<out_dir>/experiment/<name>.yaml``."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    try:
        best = study.best_trial
    except ValueError as e:
        raise ConfigError(f"study {study_name!r} in {storage} has no completed trial to export") from e
    config_group_names = config_groups()
    groups, values = [], []
    for override in best.user_attrs.get("overrides", []):
        key, _, value = override.partition("=")
        if key.startswith(("hydra.", "hparams_search", "optuna_trial", "+hydra", "experiment")):
            continue
        is_group = "." not in key and key.lstrip("+~") in config_group_names
        (groups if is_group else values).append((key.lstrip("+"), value))
    lines = [
        "# @package _global_",
        f"# Best trial {best.number} of Optuna study {study_name!r} ({storage}): {study.directions[0].name.lower()} value {best.value}",
    ]
    if groups:
        lines += ["defaults:"] + [f"  - override /{k}: {v}" for k, v in groups]
    body = OmegaConf.to_yaml(OmegaConf.from_dotlist([f"{k}={v}" for k, v in values])) if values else ""
    path = out_dir / "experiment" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n\n" + body)
    return path


def report(storage: str, study_name: str) -> str:
    """Trial states and training steps of a study: what pruning saved, in steps."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    lines, total = [], 0
    for t in study.trials:
        steps = t.user_attrs.get("steps", t.user_attrs.get("pruned_at_step", 0))
        total += steps
        lines.append(f"trial {t.number:3d}  {t.state.name:8s}  steps {steps:6d}  value {t.value}")
    states = [t.state.name for t in study.trials]
    lines.append(
        f"{len(states)} trials: "
        + ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
        + f"; {total} training steps"
    )
    return "\n".join(lines)
