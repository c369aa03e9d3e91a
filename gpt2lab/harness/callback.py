"""``callbacks.harness``: lm-evaluation-harness tasks while a model trains, as llm.c and nanoGPT track HellaSwag.

Every ``every_n_validations`` validations of a fit, the model in training is scored on ``tasks`` (at most ``limit``
examples each) and ``harness/<task>/<metric>`` goes to the run's loggers at that step. Off while ``tasks`` is empty
(the default). A task that cannot be had (no network, lm-eval not installed) is one warning at the start, and the
run goes on without it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.trainer.states import TrainerFn

from gpt2lab.checkpoint import rng_states, set_rng_states
from gpt2lab.console import format_duration
from gpt2lab.errors import ConfigError
from gpt2lab.harness.tasks import flat_metrics, load_tasks, run_tasks
from gpt2lab.model.generation import eager_decoding

log = logging.getLogger("gpt2lab.harness")


class Harness(pl.Callback):
    """lm-eval's ``tasks`` on the model in training, inside validation (so throughput figures leave it out)."""

    def __init__(
        self,
        tasks: list[str] | tuple[str, ...] = (),
        every_n_validations: int = 1,
        limit: int | None = 500,
        num_fewshot: int | None = None,
        include_path: str | None = None,
        batch_size: int = 16,
    ) -> None:
        for key, value, ok in (  # checked as the run starts, not at its first validation
            ("every_n_validations", every_n_validations, every_n_validations >= 1),
            ("limit", limit, limit is None or limit > 0),
            ("num_fewshot", num_fewshot, num_fewshot is None or num_fewshot >= 0),
            ("batch_size", batch_size, batch_size >= 1),
        ):
            if not ok:
                raise ConfigError(f"callbacks.harness.{key}={value}: expected a positive number")
        self.names = [tasks] if isinstance(tasks, str) else list(tasks)
        self.every, self.limit, self.num_fewshot = every_n_validations, limit, num_fewshot
        self.include_path, self.batch_size = include_path, batch_size
        self._tasks: list[Any] = []
        self._validations = 0
        self.seconds = 0.0  # spent scoring, over the whole fit
        self._fit_started = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = state_dict.get("validations", 0)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        if not self.names or not trainer.is_global_zero:
            return
        if getattr(pl_module, "tokenizer", None) is None:
            log.warning("callbacks.harness: the model has no tokenizer to read tasks with; training goes on without")
            return
        try:
            self._tasks = load_tasks(self.names, self.include_path)
        except ConfigError as e:
            log.warning("callbacks.harness: %s. Training goes on without these tasks.", e)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or not self._tasks:
            return
        self._validations += 1
        if self._validations % self.every or isinstance(trainer.strategy, FSDPStrategy):  # FSDP: weights sharded
            return
        from gpt2lab.harness.lm import GPT2LabLM

        started = time.perf_counter()
        lm = GPT2LabLM.from_model(pl_module.model, pl_module.tokenizer, batch_size=self.batch_size)
        states = rng_states()  # lm-eval seeds python, numpy and torch: training goes on as if it had not run
        try:
            with eager_decoding():  # a model compiled for training would compile again for every request shape
                results = run_tasks(lm, self._tasks, self.limit, self.num_fewshot)
        finally:
            set_rng_states(states)
        spent = time.perf_counter() - started
        self.seconds += spent
        metrics = {f"harness/{k}": v for k, v in flat_metrics(results).items() if not k.endswith("_stderr")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        shown = ", ".join(f"{k.removeprefix('harness/')} {v:.4f}" for k, v in metrics.items())
        log.info("Step %d: %s (%s)", trainer.global_step, shown, format_duration(spent))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._tasks and self.seconds:
            share = self.seconds / max(time.perf_counter() - self._fit_started, 1e-9)
            log.info(
                "callbacks.harness: %s scoring %s, %.1f%% of the fit's time",
                format_duration(self.seconds), ", ".join(self.names), 100 * share,
            )  # fmt: skip
