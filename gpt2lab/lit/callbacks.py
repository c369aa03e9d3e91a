"""Callbacks gpt2lab adds to Lightning's own."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.throughput import get_available_flops
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from gpt2lab.errors import ConfigError

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peaks (datasheets, without the 2:4 sparsity doubling). Lightning's own table
# lists the H200 at its sparse figure and does not match the plain "NVIDIA H200" device name.
DENSE_16BIT_FLOPS = {"h200": 989.5e12, "h100 pcie": 756e12, "h100": 989.5e12, "a100": 312e12, "l4": 121e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for ``dtype`` matmuls, the denominator of MFU; None if unknown."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device).lower()
        for chip, flops in DENSE_16BIT_FLOPS.items():
            if all(word in name for word in chip.split()):
                return flops
    return get_available_flops(device, dtype)


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting (``bf16-mixed`` -> bfloat16)."""
    precision = str(precision)
    return torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32


class ThroughputLogger(pl.Callback):
    """Logs ``perf/tokens_per_sec`` and ``perf/mfu`` every ``log_every_n_steps`` without a per-step host
    sync (Lightning's ``ThroughputMonitor`` synchronises CUDA after every batch). Validation time is
    excluded. Totals for the whole run are kept for ``results.json``.

    After ``estimate_after`` optimizer steps past the first (which carries compilation and warm-up) it logs
    how long the rest of the training will take on this device, so a run of hours says so in its first
    minute."""

    def __init__(self, estimate_after: int = 5) -> None:
        self.estimate_after = estimate_after
        self._estimate_start: tuple[int, float] | None = None  # (optimizer step, time) the estimate counts from
        self._validation_start = 0.0
        self.tokens = 0  # trained tokens, all ranks
        self.seconds = 0.0  # time spent in training batches
        self._window_tokens = 0
        self._t0: float | None = None
        self._peak_flops: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._peak_flops = peak_flops(trainer.strategy.root_device, precision_dtype(trainer.precision))
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._window_tokens += (batch.shape[1] - 1) * batch.shape[0] * trainer.world_size
        if self.estimate_after and not trainer.fit_loop._should_accumulate():
            self._estimate(trainer, batch)
        last = trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps  # also written
        if trainer.fit_loop._should_accumulate() or not (trainer._logger_connector.should_update_logs or last):
            return
        # Logging the loss already syncs the host on this step, so the clock is honest here.
        now = time.perf_counter()
        elapsed = now - (self._t0 or now)
        self._t0 = now
        self.tokens += self._window_tokens
        self.seconds += elapsed
        if elapsed > 0:
            tokens_per_sec = self._window_tokens / elapsed
            pl_module.log("perf/tokens_per_sec", tokens_per_sec)
            flops = getattr(pl_module.model, "flops_per_token", None)
            if self._peak_flops and flops is not None:
                pl_module.log("perf/mfu", tokens_per_sec * flops() / (self._peak_flops * trainer.world_size))
        self._window_tokens = 0

    def _estimate(self, trainer: pl.Trainer, batch: torch.Tensor) -> None:
        """Two host syncs in the whole run: where the estimate's window starts and where it ends."""
        if self._estimate_start is None:
            _synchronize(trainer.strategy.root_device)
            self._estimate_start = (trainer.global_step, time.perf_counter())
            return
        start_step, start = self._estimate_start
        steps = trainer.global_step - start_step
        if steps != self.estimate_after:
            return
        _synchronize(trainer.strategy.root_device)
        per_step = (time.perf_counter() - start) / steps
        total = trainer.max_steps if trainer.max_steps not in (None, -1) else trainer.estimated_stepping_batches
        seconds = per_step * max(total - trainer.global_step, 0)
        tokens = (batch.shape[1] - 1) * batch.shape[0] * trainer.world_size * trainer.accumulate_grad_batches
        message = (
            f"Estimated training time: {format_duration(seconds)} for the remaining "
            f"{max(total - trainer.global_step, 0):,} steps at {per_step:.3g} s/step "
            f"({tokens / per_step:,.0f} tokens/s on {trainer.strategy.root_device.type}), validation not included"
        )
        if trainer.is_global_zero:
            log.info(message)
            if seconds > 3600 and trainer.strategy.root_device.type == "cpu":
                log.warning(
                    "This run will take hours on the CPU: a GPU (trainer=gpu), a smaller model (preset=tiny) or "
                    "fewer steps (trainer.max_steps) will finish sooner; trainer.max_time caps it"
                )
        self.estimate_after = 0  # done

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()
        if self._t0 is not None and not trainer.sanity_checking:
            self.seconds += time.perf_counter() - self._t0
            self.tokens += self._window_tokens
            self._window_tokens = 0
            self._t0 = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._t0 = time.perf_counter()
            if self._estimate_start is not None:  # the estimate times training steps only
                step, start = self._estimate_start
                self._estimate_start = (step, start + self._t0 - self._validation_start)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_validation_start(trainer, pl_module)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def format_duration(seconds: float) -> str:
    """``3 min 05 s``, ``2 h 10 min``: how long, at a glance."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, showing training metrics without a host sync per step.

    A value logged with ``self.log(..., prog_bar=True)`` is turned into a Python number after every batch,
    whether or not the bar redraws then (Lightning issue #21232). That waits for the GPU once per step,
    which cost about 3% of a GPT-2 small step on an H200. So the training step logs its metrics without
    ``prog_bar``, and this bar reads ``metrics`` only when it redraws, every ``refresh_rate`` batches.
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False, metrics: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self.metrics = list(metrics)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        for key in self.metrics:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                items[key] = value.item() if isinstance(value, torch.Tensor) else value
        return items


class Samples(pl.Callback):
    """Every ``every_n_validations`` validations of a fit, continuations of ``prompts`` (decoded as
    ``python -m gpt2lab.generate`` does, ``seed`` fixed so that the steps compare) are appended with the step
    to ``dirpath/samples.jsonl``: how the model's writing changes as it trains. Inside the validation, so the
    throughput figures leave it out."""

    def __init__(
        self,
        dirpath: str,
        prompts: list[str] | tuple[str, ...] = ("def ",),
        every_n_validations: int = 1,
        max_new_tokens: int = 48,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
    ) -> None:
        self.path = Path(dirpath) / "samples.jsonl"
        self.prompts = list(prompts)
        self.every = every_n_validations
        self.settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}
        self._validations = 0
        self._rows: list[list[Any]] = []

    def state_dict(self) -> dict[str, Any]:
        """In each checkpoint: a resumed run's wandb table goes on from these rows (a logged table replaces the
        last one, so without them the resumed run's table would start again)."""
        return {"validations": self._validations, "rows": self._rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = state_dict.get("validations", 0)
        self._rows = [list(row) for row in state_dict.get("rows", [])]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not self.prompts:
            return
        self._validations += 1
        if self._validations % self.every or not trainer.is_global_zero or pl_module.tokenizer is None:
            return
        if isinstance(trainer.strategy, FSDPStrategy):  # the weights are sharded over the ranks
            return
        from gpt2lab.inference.generator import complete

        try:  # complete() decodes eagerly: a compiled model would compile again for every decoding shape
            texts = complete(pl_module.model, pl_module.tokenizer, self.prompts, self.settings)
        except RuntimeError as e:  # e.g. weights gone NaN: the run's own check reports that
            log.warning("No samples at step %d: %s", trainer.global_step, e)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = [[trainer.global_step, prompt, text] for prompt, text in zip(self.prompts, texts, strict=True)]
        with self.path.open("a") as f:
            for step, prompt, text in rows:
                f.write(json.dumps({"step": step, "prompt": prompt, "completion": text}) + "\n")
        self._rows += rows
        for logger in trainer.loggers:  # wandb: one table of every sample so far (a logged table is not appended to)
            if isinstance(logger, WandbLogger):
                logger.log_table(
                    "samples", columns=["step", "prompt", "completion"], data=self._rows, step=trainer.global_step
                )


class Curves(pl.Callback):
    """At the end of training, ``dirpath/curves.png``: training and validation loss, validation bits per byte and
    the learning rate against steps, read back from the CSV logger's ``metrics.csv`` (``gpt2lab.runs`` draws it).
    Also when training stops with an error: the curve of a diverging run is worth seeing. Rank zero only; a run
    with no CSV logger, or no loss logged yet, writes nothing and says so, and a figure never stops a run."""

    def __init__(self, dirpath: str, filename: str = "curves.png") -> None:
        self.path = Path(dirpath) / filename

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._draw(trainer)

    def _draw(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is None:
            log.info("No %s: the run has no CSV logger (logger=csv) to read its metrics from", self.path.name)
            return
        from gpt2lab.runs.table import plot_run_curves, read_metrics

        try:
            csv_logger.save()  # Lightning flushes the rows only every 100 steps and after this hook
            metrics = read_metrics(Path(csv_logger.experiment.metrics_file_path))
            drawn = plot_run_curves(metrics, self.path, title=f"{self.path.parent.parent.name}/{self.path.parent.name}")
        except Exception as e:  # a figure is not worth a run
            log.warning("No %s: %s: %s", self.path.name, type(e).__name__, e)
            return
        if drawn:
            log.info("Curves: %s", self.path)
        else:
            log.info("No %s: no loss was logged before the run ended (trainer.log_every_n_steps)", self.path.name)


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
