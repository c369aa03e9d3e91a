"""Test-only callbacks, loaded by the CLI from ``+callbacks.<name>._target_=helpers.<Class>``."""

import os
import signal
import signal as signal_module

import pytorch_lightning as pl
import torch


class KillAtStep(pl.Callback):
    """SIGKILL the training process right after optimizer step ``step``: a crash, not a clean exit."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class OutOfMemoryAtStep(pl.Callback):
    """Raise the CUDA out-of-memory error after optimizer step ``step``, as a too-large batch would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")


class SignalAtStep(pl.Callback):
    """Send this process ``signal`` (SIGTERM, SIGINT, ...) right after optimizer step ``step``, as a cluster
    preempting the job or a person pressing Ctrl-C would."""

    def __init__(self, step: int, signal: str = "SIGTERM") -> None:
        self.step = step
        self.signal = getattr(signal_module, signal)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signal)


class Bigram(torch.nn.Module):
    """A model=module with no hidden layer: each token's logits are a row of one table (an embedding)."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)
