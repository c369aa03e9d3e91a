"""An Optuna study on disk: its storage (SQLite by default, with heartbeats for workers that die), the trials
handed back when a worker stops, the results and plots written beside it, and reading it back afterwards
(``python -m gpt2lab.sweep report|export-best``) without ever creating a database by mistake."""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from gpt2lab.config import config_groups
from gpt2lab.config.experiments import check_experiment_name, write_experiment
from gpt2lab.errors import ConfigError
from gpt2lab.secrets import redact

log = logging.getLogger("gpt2lab.sweep.optuna_sweeper")
SQLITE_BUSY_TIMEOUT_S = 120


def default_storage(sweep_dir: str | Path) -> str:
    return f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}"


def open_storage(
    url: str, heartbeat_interval: int | None = None, grace_period: int | None = None, max_retry: int | None = None
) -> optuna.storages.RDBStorage:
    """The study's database. With ``heartbeat_interval``, each worker records a heartbeat for the trials it runs, and
    a RUNNING trial without one for ``grace_period`` seconds (its worker was killed, its machine lost) is failed by
    the next worker that asks for a trial and queued again with the same parameters, up to ``max_retry`` times.
    SQLite waits up to ``SQLITE_BUSY_TIMEOUT_S`` for another worker's write instead of Python's 5 s, so that
    workers writing at once (asks, tells, heartbeats, pruning reports) queue rather than fail."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if url.startswith("sqlite") else None
    with warnings.catch_warnings():  # heartbeats and retries are marked experimental; gpt2lab's tests cover them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry) if heartbeat_interval else None
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
            heartbeat_stale_trial_callback=retry,
        )  # fmt: skip


def retried_from(storage: optuna.storages.BaseStorage, trial: optuna.trial.Trial) -> int | None:
    """The number of the trial that ``trial`` re-runs, if it is the retry of a trial whose worker died."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(storage.get_trial(trial._trial_id))


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> Iterator[None]:
    """Record the trials' heartbeat every ``heartbeat_interval`` seconds while their jobs run, from a thread of this
    worker: when the worker dies the heartbeat stops, and another worker fails and re-runs its trials."""
    interval = storage.get_heartbeat_interval()
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            for trial_id in trial_ids:
                try:
                    storage.record_heartbeat(trial_id)
                except Exception as e:  # the database busy or out of reach: the next beat tries again
                    log.warning("No heartbeat recorded for trial id %d: %s", trial_id, e)

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def hand_back(study: optuna.Study, storage: optuna.storages.RDBStorage, trials: list[optuna.trial.Trial]) -> None:
    """Fail the trials of a worker that is being stopped (Ctrl-C, SIGTERM) and queue their retries at once, as the
    heartbeat would after ``grace_period``: the next worker, or this command run again, starts with them."""
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial in trials:
        try:
            tell(study, trial, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # reaped by another worker, which queued the retry
            continue
        frozen = storage.get_trial(trial._trial_id)
        log.warning("Trial %d stopped with its worker%s", trial.number, "; queued to run again" if retry else "")
        if retry is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry(study, frozen)


def tell(study: optuna.Study, trial: optuna.trial.Trial, **kwargs: Any) -> None:
    """``study.tell``, for a trial another worker may have failed as stale meanwhile (UpdateFinishedTrialError)."""
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as e:  # GridSampler calls study.stop() once the grid is done, which Optuna
        if "Study.stop" not in str(e):  # only allows inside an objective; the trial is recorded anyway
            raise
    except ValueError as e:  # another worker failed it as stale in the meantime
        if not str(e).startswith("Cannot tell a "):
            raise
        raise optuna.exceptions.UpdateFinishedTrialError(str(e)) from e


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


def load_existing_study(storage: str, study_name: str) -> optuna.Study:
    """The study ``study_name`` of ``storage``, read as it is: a database that does not exist is named and never
    created (Optuna's SQLite storage makes an empty one on connecting), and a study name it lacks is a ConfigError
    listing the studies there."""
    shown = redact(storage)
    if storage.startswith("sqlite:///"):
        path = Path(storage.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ConfigError(
                f"--storage {shown}: no such file {path}; a study's database is <sweep dir>/optuna.db "
                "(outputs/optuna/<study_name>/optuna.db for hparams_search=optuna)"
            )
    try:
        names = optuna.get_all_study_names(storage=storage)
    except Exception as e:  # SQLAlchemy's errors for a URL it cannot open: a file that is no database, a server
        raise ConfigError(
            f"--storage {shown} cannot be read as an Optuna study's database ({type(e).__name__}: {e})"
        ) from None
    if study_name not in names:
        found = ", ".join(sorted(names)) or "none"
        raise ConfigError(f"--study-name {study_name}: no such study in {shown}; its studies: {found}")
    return optuna.load_study(study_name=study_name, storage=storage)


def export_best(storage: str, study_name: str, name: str, out_dir: Path, overwrite: bool = False) -> Path:
    """Write the best trial's overrides as ``<out_dir>/experiment/<name>.yaml`` (through the one experiment writer:
    an existing file is refused, naming it, unless ``overwrite``)."""
    check_experiment_name(name)  # before the study is read
    study = load_existing_study(storage, study_name)
    try:
        best = study.best_trial
    except ValueError as e:
        raise ConfigError(f"study {study_name!r} in {redact(storage)} has no completed trial to export") from e
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
        f"# Best trial {best.number} of Optuna study {study_name!r} ({redact(storage)}): {study.directions[0].name.lower()} value {best.value}",
    ]
    if groups:
        lines += ["defaults:"] + [f"  - override /{k}: {v}" for k, v in groups]
    body = OmegaConf.to_yaml(OmegaConf.from_dotlist([f"{k}={v}" for k, v in values])) if values else ""
    text = "\n".join(lines) + "\n\n" + body
    return write_experiment(name, text, out_dir, overwrite=overwrite, to_replace="pass --force")


def report(storage: str, study_name: str) -> str:
    """Trial states and training steps of a study: what pruning saved, in steps."""
    study = load_existing_study(storage, study_name)
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
