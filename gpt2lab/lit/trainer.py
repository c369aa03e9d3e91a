"""The Lightning ``Trainer`` from a ``trainer`` config node, for every entry point (train, evaluate, ...)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from gpt2lab.errors import ConfigError


def make_trainer(trainer_cfg: DictConfig, **overrides: Any) -> pl.Trainer:
    """``pl.Trainer(**trainer_cfg, **overrides)``; a value Lightning rejects is reported with the fix."""
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
