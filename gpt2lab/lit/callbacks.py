"""Callbacks gpt2lab adds to Lightning's own that report on a run as it trains: the progress bar, throughput and
MFU with the time left, samples of the model's writing, and the curves at the end.

The callbacks that save and stop a run live in ``gpt2lab.lit.checkpoints``; they are importable from here as
well, under the names ``conf/callbacks/`` and saved run configs give them (``gpt2lab.lit.callbacks.<Name>``)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from tokenizers import Tokenizer

from gpt2lab.console import format_duration
from gpt2lab.errors import ConfigError
from gpt2lab.lit.checkpoints import AtomicCheckpointIO, Preemption, RunSettings, StepBoundaryCheckpoint
from gpt2lab.lit.curves import plot_run_curves, read_metrics
from gpt2lab.lit.speed import peak_flops, precision_dtype, synchronize
from gpt2lab.model import GPT2Model
from gpt2lab.model.generation import eager_decoding
from gpt2lab.tokenizers import EOS_TOKEN

# The checkpoint callbacks are re-exported: conf/callbacks/ and saved run configs name them here.
__all__ = [
    "AtomicCheckpointIO",
    "Curves",
    "Preemption",
    "ProgressBar",
    "RunSettings",
    "Samples",
    "StepBoundaryCheckpoint",
    "ThroughputLogger",
    "complete_prompts",
]

log = logging.getLogger(__name__)


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
            synchronize(trainer.strategy.root_device)
            self._estimate_start = (trainer.global_step, time.perf_counter())
            return
        start_step, start = self._estimate_start
        steps = trainer.global_step - start_step
        if steps != self.estimate_after:
            return
        synchronize(trainer.strategy.root_device)
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
        for key, value, ok in (  # checked here, as the run starts, rather than at its first validation
            ("every_n_validations", every_n_validations, every_n_validations >= 1),
            ("max_new_tokens", max_new_tokens, max_new_tokens >= 1),
            ("temperature", temperature, temperature > 0),
            ("top_k", top_k, top_k is None or top_k >= 1),
        ):
            if not ok:
                expected = "> 0" if key == "temperature" else "at least 1" + (", or null" if key == "top_k" else "")
                raise ConfigError(f"callbacks.samples.{key}={value}: expected {expected}")
        if any(not prompt for prompt in prompts):
            raise ConfigError(f"callbacks.samples.prompts={list(prompts)}: a prompt is empty (the model needs text)")
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
        try:
            texts = complete_prompts(pl_module.model, pl_module.tokenizer, self.prompts, self.settings)
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


def complete_prompts(
    model: GPT2Model, tokenizer: Tokenizer, prompts: list[str], settings: Mapping[str, Any]
) -> list[str]:
    """The continuation of each prompt, sampled as ``python -m gpt2lab.generate`` samples it with these
    ``settings`` (``max_new_tokens``, ``temperature``, ``top_k``, ``seed``): prompts left-padded into one batch,
    each ending at end-of-text. Decoded eagerly: a model compiled for training would compile again for every
    decoding shape."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    encoded = [tokenizer.encode(prompt).ids for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    device = model.wte.weight.device
    input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    with eager_decoding():
        tokens = model.generate(
            input_ids, settings["max_new_tokens"], settings["temperature"], settings["top_k"],
            attention_mask=mask, eos_token_id=eos, seed=settings["seed"],
        )  # fmt: skip
    rows = [row[: row.index(eos)] if eos in row else row for row in tokens[:, width:].tolist()]
    return [tokenizer.decode(row) for row in rows]


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
