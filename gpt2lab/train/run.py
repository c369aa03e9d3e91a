"""Training, as stages read top to bottom: resolve the plan (``gpt2lab.train.plan``), build the Trainer, prepare the
data, build the model, resume or load initial weights, record the plan, fit and test, report the results.

``train`` is the task of ``python train.py`` (``gpt2lab/train/__main__.py``) and of its sweeps, to which it returns
the metric they optimize; ``train_run`` returns the whole run, for the Python API (``gpt2lab/train/api.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import execution_whitelist, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.utilities.exceptions import SIGTERMException
from tokenizers import Tokenizer

from gpt2lab.checkpoint import (
    check_same_optimization,
    check_same_run,
    check_steps_left,
    load_checkpoint,
    resolve_ckpt_path,
    run_settings,
)
from gpt2lab.config import TRUSTED_TARGETS
from gpt2lab.data import GPT2DataModule
from gpt2lab.errors import ConfigError
from gpt2lab.hf import load_pretrained_weights
from gpt2lab.inference.generator import sample_text
from gpt2lab.lit import GPT2LitModule
from gpt2lab.lit.callbacks import Samples, ThroughputLogger
from gpt2lab.lit.checkpoints import AtomicCheckpointIO, Preemption, RunSettings
from gpt2lab.lit.cpu_threads import set_free_cores, thread_count_restored
from gpt2lab.lit.ddp import use_job_command_for_ddp
from gpt2lab.lit.loggers import continue_wandb_run, finish_wandb_run, keep_csv_history
from gpt2lab.lit.trainer import make_trainer, out_of_memory_message, parallel_job_share
from gpt2lab.secrets import redact_config
from gpt2lab.sweep.summary import job_outcome
from gpt2lab.train.plan import Plan, resolve_plan

log = logging.getLogger("gpt2lab.train")
DDP_LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# The CSV logger writes into the Hydra run directory, which always holds the log and .hydra/ already;
# Lightning's warning that "previous log files will be deleted" does not apply (only metrics.csv is written).
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
# Mid-epoch resume is exact: GPT2DataModule.train_dataloader starts the sampler after the batches the
# checkpointed run had consumed (tests/test_train.py checks the final loss), so this warning is moot.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
# A resumed run writes into its own new run directory by design (the checkpoint's run stays as it was), so
# ModelCheckpoint's "dirpath has changed ... won't be reloaded" is expected, not a problem to report.
warnings.filterwarnings("ignore", message=r"The dirpath has changed from")


@dataclasses.dataclass
class TrainedRun:
    """What a run leaves besides its directory: the metric sweepers optimize, ``results.json``'s content, and
    the trained model and its tokenizer (for the Python API, ``gpt2lab.api.train_model``)."""

    metric: float | None
    results: dict[str, Any]
    model: torch.nn.Module
    tokenizer: Tokenizer
    output_dir: Path


def train(cfg: DictConfig) -> float | None:
    """Train one model as ``cfg`` describes; return ``cfg.optimized_metric`` for sweepers."""
    return train_run(cfg).metric


def train_run(cfg: DictConfig) -> TrainedRun:
    """``train``, returning the whole ``TrainedRun``."""
    launch_env = {k: os.environ.get(k) for k in DDP_LAUNCH_VARS}
    outcome = JobReturn(status=JobStatus.FAILED)
    # The run's CPU thread count (set_free_cores, a parallel job's share) lasts as long as the run: a notebook
    # calling train_model, or the next in-process run, gets its own count back.
    with execution_whitelist(TRUSTED_TARGETS), thread_count_restored():
        try:
            run = _train(cfg)
            outcome = JobReturn(status=JobStatus.COMPLETED, _return_value=run.metric)
            return run
        except BaseException as e:
            outcome._return_value = e
            raise
        finally:  # the job's wandb run ends here, failed or not, before the next job of a multirun starts
            finish_wandb_run(job_outcome(outcome, cfg.optimized_metric).status, cfg.optuna_trial)
            # A DDP job leaves its process group and, in the launching process, the variables Lightning
            # set to start its ranks (LOCAL_RANK=0 among them, which would make the next job of a multirun
            # wait for ranks nobody starts). Undo both so that each job launches afresh.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for key, value in launch_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _train(cfg: DictConfig) -> TrainedRun:
    """The run's stages, top to bottom; each reads the plan and what the stages before it built."""
    pl.seed_everything(cfg.seed, workers=True)
    plan = resolve_plan(cfg)  # checked and resolved; read-only from here on
    trainer = build_trainer(plan)
    datamodule = prepare_data(plan)
    plan = plan.with_vocabulary(datamodule.tokenizer)
    module = build_model(plan, datamodule.tokenizer)
    plan = resume_or_initialize(plan, trainer, module, datamodule.tokenizer)
    record_plan(plan, trainer, datamodule)
    fitted = fit_and_test(plan, trainer, module, datamodule)
    return report_results(plan, trainer, module, datamodule.tokenizer, fitted)


def build_trainer(plan: Plan) -> pl.Trainer:
    """The Trainer, with the run's callbacks (those its switches leave on, and Optuna's pruning in a sweep) and
    loggers. Lightning refuses a bad accelerator, precision or strategy here, before any data is read."""
    cfg = plan.cfg
    use_job_command_for_ddp()  # Lightning's DDP launcher starts the other ranks with this job's command line
    callbacks = [c for c in (instantiate(c) for c in cfg.callbacks.values() if c) if _wanted(c, cfg.trainer, plan.gpt2)]
    if cfg.optuna_trial is not None:
        from gpt2lab.sweep.optuna_sweeper import OptunaPruning  # Optuna is imported only for sweeps

        callbacks.append(OptunaPruning(cfg.optuna_trial, monitor=cfg.optimized_metric))
    loggers = [instantiate(c) for c in cfg.logger.values() if c] if cfg.trainer.logger is not False else False
    share = parallel_job_share()
    trainer = make_trainer(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()], **share)
    if trainer.strategy.root_device.type == "cpu" and trainer.world_size == 1:
        set_free_cores()  # a busy machine: fewer threads than cores (DDP ranks get their share from Lightning);
        # train_run restores the count when the run ends
    return trainer


def prepare_data(plan: Plan) -> GPT2DataModule:
    """The data module with its tokenizer built and its corpus tokenized (each step cached on disk)."""
    datamodule = instantiate(plan.cfg.data, tokenizer=plan.tokenizer)
    datamodule.prepare_data()
    return datamodule


def build_model(plan: Plan, tokenizer: Tokenizer) -> GPT2LitModule:
    """The LightningModule with fresh weights: gpt2lab's GPT-2 from its config at the plan's vocabulary, or the model
    ``model=hf`` / ``model=module`` names, which GPT2LitModule builds and its checkpoints record."""
    cfg = plan.cfg
    model_config = instantiate(cfg.model, vocab_size=plan.vocab_size) if plan.gpt2 else cfg.model
    module = GPT2LitModule(
        model_config,
        cfg.optimizer,
        cfg.scheduler,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        compile_options=cfg.compile_options,
        compile_optimize_ddp=cfg.compile_optimize_ddp,
    )
    module.tokenizer = tokenizer
    log.info("Model: %s parameters (%s)", f"{module.model.num_parameters():,}", model_config)
    return module


def resume_or_initialize(plan: Plan, trainer: pl.Trainer, module: GPT2LitModule, tokenizer: Tokenizer) -> Plan:
    """The checkpoint the run goes on from, checked against this run (model, tokenizer, data, batch layout, steps
    left), with its wandb run and metrics.csv continued; else ``model.init_from``'s pretrained weights, if any.
    Returns the plan with the checkpoint file it resumes from."""
    cfg = plan.cfg
    # Now that the model is known, `last` can pass over checkpoints of other models
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, exclude=plan.output_dir, model=module.hparams.model)
    settings = run_settings(cfg, trainer.world_size)
    trainer.callbacks.append(RunSettings(settings))  # recorded in each checkpoint, for a run resuming from it
    if ckpt_path:
        check_same_run(ckpt_path, settings, tokenizer, strict=cfg.resume.strict)  # tokenizer, data, batch layout
        check_steps_left(ckpt_path, cfg.trainer.max_steps)
        check_same_optimization(ckpt_path, module.hparams.optimizer, module.hparams.scheduler)
        log.info("Resuming from %s", ckpt_path)
        continue_wandb_run(trainer.loggers, ckpt_path)
        keep_csv_history(trainer.loggers, ckpt_path)
    elif plan.gpt2 and cfg.model.init_from:
        load_pretrained_weights(module.model, cfg.model.init_from)
        log.info("Weights: GPT-2 from %s", cfg.model.init_from)
    return plan.resuming(ckpt_path)


def record_plan(plan: Plan, trainer: pl.Trainer, datamodule: GPT2DataModule) -> None:
    """The run directory's ``tokenizer.json`` and ``config.yaml`` (the plan's config, resolved, secrets masked), and
    the same config with the data's token counts as the loggers' hyperparameters."""
    config = redact_config(plan.cfg, resolve=True)  # resolved, then redacted: ${oc.env:...} resolves to the secret
    if trainer.is_global_zero:
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        datamodule.tokenizer.save(str(plan.output_dir / "tokenizer.json"))
        (plan.output_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    for lg in trainer.loggers:
        lg.log_hyperparams({"config": config, "data_stats": datamodule.stats})
    for stage, split in (("val", "validation"), ("test", "test")):
        if (subset := scored_subset(plan.cfg, datamodule.stats, stage, split)) is not None:
            log.info(subset)


def scored_subset(cfg: DictConfig, stats: dict[str, Any], stage: str, split: str) -> str | None:
    """What a run's ``val/*`` or ``test/*`` cover when ``trainer.limit_<stage>_batches`` scores only the first
    batches of the split, for speed (None when they cover it whole): said once at the start."""
    limit = cfg.trainer.get(f"limit_{stage}_batches")
    if limit is None or split not in stats or (isinstance(limit, float) and limit >= 1):
        return None
    total = stats[split]["tokens"]
    batch = (cfg.data.get("eval_batch_size") or cfg.data.batch_size) * cfg.data.max_length
    scored = min(int(limit * total) if isinstance(limit, float) else limit * batch, total)
    return (
        f"{stage}/* score the first {scored:,} of the {split} split's {total:,} tokens ({scored / max(total, 1):.0%}), "
        f"for speed (trainer.limit_{stage}_batches={limit}); python -m gpt2lab.evaluate scores the whole split"
    )


@dataclasses.dataclass
class Fitted:
    """What fit and test leave for the results."""

    metrics: dict[str, float]  # the last logged value of each metric: fit's, then test's over them
    best: str  # the best checkpoint's path; "" when none was saved
    initial_val_loss: float | None  # the step-0 validation loss (validate_at_start)
    sharded: bool  # under FSDP the trained module holds shards: whole weights are in the checkpoint only


def fit_and_test(plan: Plan, trainer: pl.Trainer, module: GPT2LitModule, datamodule: GPT2DataModule) -> Fitted:
    """The step-0 validation (a reference for the run's progress), ``fit``, and the test with the best checkpoint.
    Out of GPU memory is told with the knobs to turn; a stop by signal with where the run stands."""
    cfg = plan.cfg
    # FSDP wraps a module's decoder blocks in place, and a later stage that finds them wrapped leaves the rest of
    # the model sharded: under FSDP each stage gets its own copy of the unwrapped module.
    sharded = isinstance(trainer.strategy, FSDPStrategy)
    unwrapped = copy.deepcopy(module) if sharded else module
    initial_val_loss = None
    try:
        if cfg.validate_at_start and not plan.resume_from:
            first = copy.deepcopy(unwrapped) if sharded else module
            initial_val_loss = trainer.validate(first, datamodule=datamodule, verbose=False)[0].get("val/loss")
        trainer.fit(module, datamodule=datamodule, ckpt_path=plan.resume_from)
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if cfg.test and "test" in datamodule.datasets and len(datamodule.datasets["test"]):
            if not sharded:
                trainer.test(module, datamodule=datamodule, ckpt_path=best or None)
            elif best:
                trainer.test(unwrapped, datamodule=datamodule, ckpt_path=best)
            else:
                log.warning("test skipped: under FSDP the test reads the best checkpoint, and none was saved")
    except torch.cuda.OutOfMemoryError as e:
        raise ConfigError(out_of_memory_message(cfg, trainer)) from e
    except SIGTERMException:
        raise SystemExit(_stopped_by_signal(trainer)) from None
    metrics = fit_metrics | {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.pop("step", None)  # the loggers' x-axis (GPT2LitModule logs it), not a result
    if cfg.optimized_metric not in metrics:
        log.warning("No %s at the end of training: %s", cfg.optimized_metric, _why_no_metric(cfg, trainer))
    return Fitted(metrics, best, initial_val_loss, sharded)


def report_results(
    plan: Plan, trainer: pl.Trainer, module: GPT2LitModule, tokenizer: Tokenizer, fitted: Fitted
) -> TrainedRun:
    """A sample of the trained model's text, and ``results.json``: the best checkpoint, the metrics, the steps, the
    time and the speed; the run as ``TrainedRun``."""
    cfg = plan.cfg
    if cfg.sample and trainer.is_global_zero and plan.gpt2:
        if not fitted.sharded:
            log.info("Sample:\n%s", sample_text(module.model, tokenizer, **cfg.sample))
        elif fitted.best:  # the sharded weights are whole only in the checkpoint
            model = load_checkpoint(fitted.best, device=trainer.strategy.root_device)[0]
            log.info("Sample (best checkpoint):\n%s", sample_text(model, tokenizer, **cfg.sample))
    throughput = next((c for c in trainer.callbacks if isinstance(c, ThroughputLogger)), None)
    best_score = trainer.checkpoint_callback.best_model_score if fitted.best else None
    results = {
        "best_checkpoint": fitted.best,
        "best_val_loss": None if best_score is None else float(best_score),
        "resumed_from": plan.resume_from,
        "initial_val_loss": fitted.initial_val_loss,
        "metrics": fitted.metrics,
        "global_step": trainer.global_step,
        "duration_s": round(time.time() - plan.started, 1),
        "tokens_per_sec": round(throughput.tokens_per_sec, 1) if throughput else None,
        "parameters": module.model.num_parameters(),
    }
    if trainer.is_global_zero:
        shown = {k: v for k, v in results.items() if k != "metrics"}
        if trainer.fast_dev_run:  # a debug run: no results.json, which would mark the directory as a finished run
            log.info("Results (fast_dev_run: results.json not written): %s", json.dumps(shown))
        else:
            (plan.output_dir / "results.json").write_text(json.dumps(results, indent=2))
            log.info("Results in %s: %s", plan.output_dir, json.dumps(shown))
    return TrainedRun(fitted.metrics.get(cfg.optimized_metric), results, module.model, tokenizer, plan.output_dir)


def _stopped_by_signal(trainer: pl.Trainer) -> int:
    """Say where a run stopped by SIGTERM, SIGUSR1 or Ctrl-C stands and how to go on; return its exit status, 128 +
    the signal's number as shells report it (143 for SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C)."""
    preemption = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
    name = preemption.signal if preemption and preemption.signal else "SIGTERM"
    if preemption and preemption.checkpoint:
        log.warning(
            "Stopped by %s at step %d, with %s written. Resume with the same command and ckpt_path=%s (or "
            "ckpt_path=auto when hydra.run.dir is the same)",
            name, trainer.global_step, preemption.checkpoint, preemption.checkpoint,
        )  # fmt: skip
    else:
        log.warning(
            "Stopped by %s at step %d; no checkpoint was written (callbacks.preemption is off)",
            name,
            trainer.global_step,
        )
    if preemption and preemption.requeued:
        log.warning("Requeued SLURM job %s: it runs this job script again, same job id", preemption.requeued)
    return 128 + getattr(signal, name)


def _why_no_metric(cfg: DictConfig, trainer: pl.Trainer) -> str:
    if not trainer.enable_validation:
        return "validation is off (trainer.limit_val_batches=0 or fast_dev_run); set trainer.limit_val_batches > 0"
    if trainer.global_step == 0:
        return "no training step was taken (check trainer.max_steps, max_epochs and max_time)"
    return f"the run logged no metric of that name (optimized_metric={cfg.optimized_metric}; see metrics.csv)"


def _wanted(callback: pl.Callback, trainer_cfg: DictConfig, gpt2: bool = True) -> bool:
    """Honour trainer.enable_progress_bar / enable_checkpointing / enable_model_summary = false, which
    Lightning otherwise rejects when the matching callback is configured. Samples need gpt2lab's GPT-2."""
    if isinstance(callback, Samples) and not gpt2:
        log.info("callbacks.samples: off, generation is written for gpt2lab's GPT-2")
        return False
    switches = {
        ProgressBar: trainer_cfg.enable_progress_bar,
        ModelCheckpoint: trainer_cfg.enable_checkpointing,
        ModelSummary: trainer_cfg.enable_model_summary,
    }
    if isinstance(callback, ModelCheckpoint) and trainer_cfg.fast_dev_run:
        return False  # a debug run leaves no checkpoint that ckpt_path=last could pick up
    return not any(isinstance(callback, kind) and flag is False for kind, flag in switches.items())
