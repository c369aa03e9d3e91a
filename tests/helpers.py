"""Test-only callbacks, loaded by the CLI from ``+callbacks.<name>._target_=helpers.<Class>``."""

import os
import signal

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """SIGKILL the training process right after optimizer step ``step``: a crash, not a clean exit."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
