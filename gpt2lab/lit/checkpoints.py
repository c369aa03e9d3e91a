"""Callbacks that save and stop a run: checkpoints written only between optimizer steps and atomically, the
settings a resumed run must share recorded in each, and signals (SIGTERM, SLURM's warning, Ctrl-C) turned into a
stop with ``last.ckpt`` written. ``gpt2lab.lit.callbacks`` re-exports them: ``conf/callbacks/`` and saved run
configs name them there."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from gpt2lab.errors import ConfigError

log = logging.getLogger(__name__)


class Preemption(pl.Callback):
    """SIGTERM (Kubernetes, spot instances, torchrun, SLURM's time limit), SLURM's warning signal (SIGUSR1, from
    ``#SBATCH --signal=USR1@90``) and Ctrl-C stop training at the end of the optimizer step in progress, on every
    rank, with ``last.ckpt`` written, so that ``ckpt_path=auto`` (the same command run again) goes on from there.
    Under SLURM, the warning signal then requeues the job (``scontrol requeue``), as Lightning's
    ``SLURMEnvironment(auto_requeue=True)`` asks, unless ``requeue=False``. A second Ctrl-C stops at once, without a checkpoint.

    The handlers only note the signal. After each optimizer step the ranks agree (one all-reduce under DDP, no
    device sync on one process) and, if any was signalled, all set Lightning's ``received_sigterm`` at that same
    step; Lightning then raises ``SIGTERMException`` on each. Lightning's own handlers are replaced while
    training: its SIGTERM handler broadcasts from inside the handler, at whatever point each rank happens to be,
    which hangs DDP when a rank gets the signal twice (its launcher forwards it too); its SLURM handler saves an
    ``hpc_ckpt_N.ckpt`` from inside the handler, mid-step, into ``trainer.default_root_dir`` (the working
    directory), which Lightning then resumes by itself in any later SLURM job started there, whatever its
    ``ckpt_path``. So Lightning's requeueing is switched off and done here, after ``last.ckpt``. ``signal``,
    ``checkpoint`` and ``requeued`` (the SLURM job id) say what happened, for the run's last line
    (``gpt2lab.train``)."""

    def __init__(self, requeue: bool = True) -> None:
        self.requeue = requeue  # false: under SLURM, SIGUSR1 only stops the run
        self.signal: str | None = None
        self.checkpoint: Path | None = None
        self.requeued: str | None = None
        self._previous: dict[int, Any] = {}
        self._checked_step = 0
        self._slurm: tuple[bool, signal.Signals] | None = None  # SLURM's (auto_requeue, requeue_signal)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):
            if self._slurm is None:  # setup runs for each stage (validate, fit, test): read the user's setting once
                self._slurm = (environment.auto_requeue, environment.requeue_signal or signal.SIGUSR1)
            environment.auto_requeue = False  # Lightning registers no SLURM handler of its own (see above)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signal = self.checkpoint = self.requeued = None
        self._checked_step = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return

        def on_stop_signal(signum: int, frame: Any) -> None:
            self.signal = self.signal or signal.Signals(signum).name

        def on_sigint(signum: int, frame: Any) -> None:
            if self.signal == "SIGINT":  # asked twice: now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.signal = "SIGINT"
            log.warning("Ctrl-C: stopping after this step, with last.ckpt written (Ctrl-C again: stop at once)")

        warning_signal = self._slurm[1] if self._slurm else signal.SIGUSR1
        for signum, handler in ((signal.SIGTERM, on_stop_signal), (warning_signal, on_stop_signal)):
            self._previous.setdefault(signum, signal.signal(signum, handler))
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._checked_step:
            return  # mid-accumulation: no optimizer step since the last check
        self._checked_step = trainer.global_step
        stop = self.signal is not None
        if trainer.world_size > 1:
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        if stop:
            self.signal = self.signal or "SIGTERM"  # another rank was signalled
            trainer._signal_connector.received_sigterm = True  # Lightning stops here, raising SIGTERMException

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        dirpath = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        if dirpath:
            self.checkpoint = Path(dirpath) / "last.ckpt"
            # every rank takes part, as for any checkpoint; the whole state, to resume from (said explicitly: left
            # unset, Lightning logs "`weights_only` was not set" beside the stop message)
            trainer.save_checkpoint(self.checkpoint, weights_only=False)
        auto_requeue, warning_signal = self._slurm or (False, None)
        warned = self.signal == getattr(warning_signal, "name", None)
        if self.requeue and auto_requeue and warned and trainer.is_global_zero:
            self.requeued = requeue_slurm_job()  # after the checkpoint: SLURM ends the job's tasks as it requeues

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def requeue_slurm_job() -> str | None:
    """``scontrol requeue`` this SLURM job (an array job's own task), as Lightning's SLURM handler does; the job id
    if SLURM accepted it, else None, with the reason logged."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    if not job_id:
        log.warning("Not requeued: SLURM_JOB_ID is not set")
        return None
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("Not requeued: scontrol requeue %s failed (%s: %s)", job_id, type(e).__name__, e)
        return None
    if result.returncode != 0:
        log.warning("Not requeued: scontrol requeue %s: %s", job_id, (result.stderr or result.stdout).strip())
        return None
    return job_id


class RunSettings(pl.Callback):
    """Records in each checkpoint the settings a run resuming from it must share (tokenizer, data, batch layout:
    ``gpt2lab.checkpoint.run_settings``), where ``check_same_run`` reads them; ``train.py`` adds it to every run."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def state_dict(self) -> dict[str, Any]:
        return dict(self.settings)


class StepBoundaryCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, whose saves at the end of a training batch (``train_time_interval``,
    ``every_n_train_steps``) happen only right after an optimizer step: a checkpoint taken part-way through a
    gradient-accumulation window would lose the gradients accumulated so far (they are not saved), and a run
    resumed from it would differ from one never stopped. Its time check, which under DDP broadcasts rank 0's
    clock, then runs once per optimizer step instead of once per micro-batch."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kw: Any) -> None:
        if trainer.global_step == self._step_seen:
            return  # mid-accumulation: no optimizer step since the last batch
        self._step_seen = trainer.global_step
        super().on_train_batch_end(trainer, pl_module, *args, **kw)

    # Only the clock saves here. ModelCheckpoint would also write last.ckpt at the end of training (when it had not
    # saved one yet), at the end of each training epoch and after validation: at the end of an epoch cut short by
    # max_steps that file records the epoch as finished, and a run resumed from it would start the next epoch
    # instead of the rest of this one. Validation's last.ckpt is model_checkpoint's.
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, so a run killed while
    saving leaves the previous ``last.ckpt`` intact instead of a truncated one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            tmp.unlink(missing_ok=True)
            raise ConfigError(_unwritable_checkpoint(path, e)) from e


def _unwritable_checkpoint(path: Path, error: BaseException) -> str:
    try:
        usage = shutil.disk_usage(path.parent)
        space = f"{path.parent} has {usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.1f} GiB"
    except OSError:
        space = f"{path.parent} cannot be read"
    return (
        f"could not write the checkpoint {path.name} ({type(error).__name__}: {error}); {space}. The checkpoints "
        f"already there are intact: free space or set callbacks.model_checkpoint.dirpath to a disk with room, then "
        f"resume with ckpt_path={path.parent / 'last.ckpt'}"
    )
