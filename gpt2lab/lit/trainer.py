"""The Lightning ``Trainer`` from a ``trainer`` config node, for every entry point (train, evaluate, ...), and the
checks of a trainer config that must come before anything runs: launch, FSDP world, out-of-memory advice."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.strategies import FSDPStrategy

from gpt2lab.errors import ConfigError
from gpt2lab.lit.ddp import external_rank

log = logging.getLogger("gpt2lab.train")
# For every entry point that builds a Trainer (train, evaluate): noise that says nothing about the run.
# Lightning's pytree helper on torch >= 2.10:
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(lambda r: "💡 Tip" not in r.getMessage())  # ads


def make_trainer(trainer_cfg: DictConfig, **overrides: Any) -> pl.Trainer:
    """``pl.Trainer(**trainer_cfg, **overrides)``; a value Lightning rejects is reported with the fix."""
    if "time_budget" in trainer_cfg:  # gpt2lab's key (gpt2lab.train.plan.time_budget), not a Trainer argument
        # A plain copy without it: a node typed by TrainerSchema would get the field back from the schema
        values = OmegaConf.to_container(trainer_cfg, resolve=True)
        trainer_cfg = OmegaConf.create({k: v for k, v in values.items() if k != "time_budget"})
    interval = trainer_cfg.val_check_interval
    if isinstance(interval, float) and interval <= 1.0 and trainer_cfg.check_val_every_n_epoch is None:
        # Lightning reads a float as a fraction of an epoch (0.5: twice per epoch), but only when counting
        # epochs; gpt2lab's default counts steps across epochs, which Lightning then refuses for a float.
        overrides["check_val_every_n_epoch"] = 1
    try:
        return instantiate(trainer_cfg, **overrides)
    except Exception as e:  # Lightning rejects bad accelerator/precision/strategy values here
        cause = e.__cause__ or e
        hint = ""
        if trainer_cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            hint = " This machine has no GPU: add trainer=cpu (or trainer.accelerator=cpu trainer.precision=32-true)."
        elif "fsdp" in str(cause).lower() and trainer_cfg.accelerator not in ("gpu", "cuda", "auto"):
            hint = " FSDP shards over CUDA GPUs only; on CPUs use trainer=ddp trainer.accelerator=cpu trainer.precision=32-true."
        raise ConfigError(f"trainer: {type(cause).__name__}: {cause}{hint}") from e


def uses_fsdp(trainer_cfg: DictConfig) -> bool:
    """Whether ``trainer.strategy`` is FSDP: ``trainer=fsdp``'s ``_target_``, or Lightning's ``"fsdp"`` string."""
    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    return "fsdp" in target.lower()


def check_fsdp_world(trainer_cfg: DictConfig) -> None:
    """FSDP on a single process falls back to NO_SHARD, where torch's FSDP drops the parameters from the
    state dict after an evaluation pass: the first checkpoint would fail, after the training before it."""
    if not uses_fsdp(trainer_cfg) or trainer_cfg.get("accelerator") == "cpu" or not torch.cuda.is_available():
        return  # without GPUs Lightning refuses FSDP itself, and train() adds the hint
    launched = external_rank()
    try:  # Lightning's own reading of `devices`; a value it rejects gets its error when the Trainer is built
        devices = CUDAAccelerator.parse_devices(-1 if trainer_cfg.devices == "auto" else trainer_cfg.devices)
    except MisconfigurationException:
        return
    world_size = launched[1] if launched else len(devices or []) * trainer_cfg.num_nodes
    if world_size == 1:
        raise ConfigError(
            "trainer=fsdp with one process: FSDP shards over several GPUs, and with one it cannot save "
            "checkpoints. Use trainer.devices=2 or more, or trainer=gpu on one GPU (with "
            "model.gradient_checkpointing=true and a smaller data.batch_size if memory is short)"
        )


def check_launch(trainer_cfg: DictConfig) -> None:
    """Several machines need their ranks started by torchrun or srun, one per GPU; catch a mismatch before
    anything is written (Lightning would wait forever for ranks, or fail deep inside the first fit)."""
    launched = external_rank()
    devices, nodes = trainer_cfg.devices, trainer_cfg.num_nodes
    if launched is None:
        if nodes > 1 and "NODE_RANK" not in os.environ:
            raise ConfigError(
                f"trainer.num_nodes={nodes}: start this command on every machine with torchrun or srun "
                '(docs/multi-gpu.md, "Several machines"); on one machine use trainer.num_nodes=1'
            )
        return
    world_size = launched[1]
    if isinstance(devices, int) and devices * nodes != world_size:
        raise ConfigError(
            f"trainer.num_nodes={nodes} x trainer.devices={devices} = {devices * nodes} ranks, but the launcher "
            f"started {world_size} processes: set trainer.devices to the processes per machine (torchrun "
            "--nproc-per-node, srun --ntasks-per-node) and trainer.num_nodes to the machines"
        )


def out_of_memory_message(cfg: DictConfig, trainer: pl.Trainer) -> str:
    """What to turn when a run does not fit: the knobs, with this run's values."""
    batch, accumulate = cfg.data.batch_size, cfg.trainer.accumulate_grad_batches
    knobs = []
    if batch > 1:
        knobs.append(
            f"data.batch_size={batch // 2} trainer.accumulate_grad_batches={accumulate * 2} "
            f"(half the micro-batch, same tokens per optimizer step; now {batch} x {accumulate})"
        )
    if not cfg.model.gradient_checkpointing:
        knobs.append("model.gradient_checkpointing=true (recompute activations in backward: less memory, ~25% slower)")
    if "16" not in str(cfg.trainer.precision):  # neither bf16 nor fp16
        knobs.append("trainer.precision=bf16-mixed (half-size activations)")
    if not isinstance(trainer.strategy, FSDPStrategy):
        knobs.append("trainer=fsdp (shard weights, gradients and optimizer state over the GPUs)")
    knobs.append("a smaller model.context_length or model size")
    where = trainer.strategy.root_device
    listed = "".join(f"\n  - {k}" for k in knobs)
    return (
        f"out of GPU memory on {where} (see `python -m gpt2lab.bench --memory` for what fits). "
        f"Checkpoints already written are intact. Try, in this order:{listed}"
    )


def parallel_job_share() -> dict[str, Any]:
    """When a parallel launcher (joblib) runs several jobs on this machine at once, give each its share:
    one GPU each (by job number) if there are GPUs, else an equal share of the CPU threads."""
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    n_jobs = hydra_cfg.launcher.get("n_jobs", 1) if hydra_cfg and hydra_cfg.mode == RunMode.MULTIRUN else 1
    if not n_jobs or n_jobs == 1:
        return {}
    n_jobs = n_jobs if n_jobs > 0 else os.cpu_count() or 1  # joblib's -1: as many as cores
    if torch.cuda.is_available():
        device = int(hydra_cfg.job.num) % torch.cuda.device_count()
        log.info("Parallel job %s of %d: GPU %d", hydra_cfg.job.num, n_jobs, device)
        return {"devices": [device]}
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    torch.set_num_threads(threads)
    log.info("Parallel job %s of %d: %d CPU thread(s)", hydra_cfg.job.num, n_jobs, threads)
    return {}
