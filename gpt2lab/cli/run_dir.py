"""The run directory: checked, claimed and announced before Hydra writes into it.

Hydra creates a run's directory and writes ``.hydra/`` into it in ``run_job``, before ``train`` runs, so
``RunDirectory`` is a Hydra callback (``conf/hydra/default.yaml``) and refuses in ``on_run_start``:
- a directory that cannot be created or written (Hydra would stop with a ``PermissionError`` or
  ``NotADirectoryError`` traceback);
- a directory that holds a finished run (``results.json``), also to resume it there: Lightning's CSV logger
  would delete its ``metrics.csv`` (a resumed run goes on in a directory of its own);
- a directory that another live run holds. The first process of a run holds ``.run.lock`` there with an
  OS lock (``filelock``, ``fcntl.flock``), which the system drops when the process dies, however it dies.
  The ranks that process starts (Lightning's DDP launcher) and the ranks ``torchrun``/``srun`` start beside
  rank 0 share the directory and take no lock.

In a multirun each job locks its own directory in ``on_job_start``. Hydra has written the job's ``.hydra/``
by then (no callback runs between a launcher choosing the job's directory and writing it), so a clash there
stops the sweep rather than the job's training. Sweeps that share a sweep directory on purpose (the
processes of one Optuna study) are not refused: their jobs have directories of their own.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gpt2lab.errors import refuse
from gpt2lab.lit.ddp import external_rank

log = logging.getLogger(__name__)
LOCK_FILE = ".run.lock"


class RunDirectory(Callback):
    def __init__(self) -> None:
        self._lock: FileLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = _run_dir(config)
        key = f"hydra.run.dir={run_dir}"
        ensure_writable(run_dir, "hydra.run.dir")
        if (run_dir / "results.json").is_file():
            # Also when resuming from it: Lightning's CSV logger would delete the run's metrics.csv.
            refuse(
                f"{key} holds a finished run (results.json). Choose another hydra.run.dir; to train that run on, "
                f"resume it into a new directory: ckpt_path={run_dir} trainer.max_steps=<more steps>"
            )
        if _starts_the_run():
            self._lock = claim(run_dir, key, "hydra.run.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        ensure_writable(Path(config.hydra.sweep.dir).absolute(), "hydra.sweep.dir")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _starts_the_run():
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if config.hydra.mode == RunMode.MULTIRUN:
            self._lock = claim(job_dir, f"the job directory {job_dir}", "hydra.sweep.dir")
        log.info("Run directory: %s", job_dir)

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def ensure_writable(directory: Path, key: str) -> None:
    """Create ``directory`` and write a file in it, or refuse, naming ``key`` (the setting that chose it)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        problem = f"{e.strerror}: {e.filename}"
    else:
        try:
            tempfile.TemporaryFile(dir=directory).close()
            return
        except OSError as e:
            problem = f"no file can be created in it: {e.strerror}"
    refuse(
        f"{key}={directory} is not a writable directory ({problem}). Set {key}, or paths.log_dir under which "
        "it goes by default, to a directory you can write to"
    )


def claim(directory: Path, what: str, key: str) -> FileLock:
    """Lock ``directory`` for this run, or refuse if another live run holds it."""
    lock = FileLock(directory / LOCK_FILE, blocking=False)
    try:
        lock.acquire()
    except Timeout:
        refuse(
            f"{what} is in use by another run, which holds {directory / LOCK_FILE}. "
            f"Wait for that run to end, or choose another {key}"
        )
    return lock


def _run_dir(config: DictConfig) -> Path:
    """``hydra.run.dir`` as ``run_job`` resolves it. It may use ``${hydra:...}``, which resolves only while the
    Hydra config is set, and Hydra sets it for a run only inside ``run_job``."""
    hydra_config, readonly = HydraConfig.instance(), OmegaConf.is_readonly(config.hydra)
    previous = hydra_config.cfg
    hydra_config.set_config(config)  # sets config.hydra read-only
    try:
        return Path(str(config.hydra.run.dir)).absolute()
    finally:
        hydra_config.cfg = previous
        OmegaConf.set_readonly(config.hydra, readonly)


def _starts_the_run() -> bool:
    """False in the ranks that share a run directory with the process that started the run: those Lightning's
    DDP launcher starts (``LOCAL_RANK`` > 0, or ``NODE_RANK`` > 0 on the other machines) and those torchrun or
    srun start beside rank 0."""
    launched = external_rank()
    if launched is not None:
        return launched[0] == 0
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
