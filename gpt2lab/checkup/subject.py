"""What every check takes (the settings, the model under check) and what it returns (a ``CheckResult``)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from tokenizers import Tokenizer

from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT2Model
from gpt2lab.model.adapter import CausalLM

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"


@dataclasses.dataclass
class CheckConfig:
    """How hard to look: the ``check`` section of ``conf/check.yaml``. Sequence lengths are capped at the
    model's context."""

    seed: int = 0
    batch_sizes: list[int] = dataclasses.field(default_factory=lambda: [1, 3])  # shape robustness
    seq_lengths: Optional[list[int]] = None  # noqa: UP045 (OmegaConf needs Optional) - shape robustness; null: 1, half the context + 1, the context
    probe_length: int = 64  # tokens per sequence in gradient flow, causality and tiers 2 and 3
    batch_size: int = 4  # memory footprint and tokens/s, at full context
    throughput_seconds: float = 2.0  # how long tokens/s is measured (at least one batch)
    prompt: Optional[str] = None  # noqa: UP045 - tier 2 on a checkpoint with a tokenizer: this text; null: random tokens
    perturbations: int = 16  # tier 2: single-token substitutions
    finetune_steps: int = 30  # tier 3: AdamW steps on one fixed batch
    finetune_lr: float = 1e-3
    lr_trials: list[float] = dataclasses.field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3])
    lr_trial_steps: int = 10

    def __post_init__(self) -> None:
        positive = {
            "batch_sizes": self.batch_sizes,
            "seq_lengths": self.seq_lengths or [1],
            "lr_trials": self.lr_trials,
            **{k: [getattr(self, k)] for k in ("probe_length", "batch_size", "perturbations", "finetune_steps")},
            **{k: [getattr(self, k)] for k in ("lr_trial_steps", "finetune_lr", "throughput_seconds")},
        }
        for key, values in positive.items():
            if not values or any(not v > 0 for v in values):
                raise ConfigError(f"check.{key}={getattr(self, key)}: expected positive values")


@dataclasses.dataclass
class CheckResult:
    """One row of the table: ``status`` is pass, warn, fail or skip; ``details`` go to the JSON report and
    ``files`` (figures) beside it."""

    name: str
    tier: int
    status: str
    summary: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


@dataclasses.dataclass
class Subject:
    """The model under check and what is known about it: whether its weights are trained (a checkpoint:
    the at-initialisation expectations do not apply), its tokenizer if any, where figures go."""

    model: GPT2Model | CausalLM
    config: CheckConfig
    trained: bool = False
    tokenizer: Tokenizer | None = None
    output_dir: Path | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def gpt2(self) -> bool:
        """gpt2lab's own GPT-2, whose layers and initialisation the checks know; else a ``CausalLM``
        (``model=hf``, ``model=module``), checked through its logits only."""
        return isinstance(self.model, GPT2Model)

    @functools.cached_property
    def vocab_size(self) -> int:
        """The logits per token: the config's, else (a ``CausalLM`` built without one) one forward's."""
        if self.gpt2 or self.model.vocab_size:
            return self.model.config.vocab_size if self.gpt2 else self.model.vocab_size
        with self.mode(training=False) as model, torch.no_grad():
            return model(torch.zeros(1, 1, dtype=torch.long, device=self.device))[0].shape[-1]

    @property
    def context(self) -> int:
        """The longest input: GPT-2's context, a ``CausalLM``'s training window."""
        return self.model.config.context_length if self.gpt2 else self.model.context_length

    @property
    def probe_length(self) -> int:
        return min(self.config.probe_length, self.context)

    def tokens(self, batch: int, length: int, seed_offset: int = 0) -> torch.Tensor:
        """(batch, length) random token ids, the same for the same arguments."""
        generator = torch.Generator().manual_seed(self.config.seed + seed_offset)
        return torch.randint(0, self.vocab_size, (batch, length), generator=generator).to(self.device)

    def figure_path(self, name: str) -> Path | None:
        if self.output_dir is None:
            return None
        path = self.output_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def mode(self, training: bool) -> Iterator[GPT2Model | CausalLM]:
        """The model in train or eval mode for one check, put back as it was after, without gradients."""
        was_training = self.model.training
        self.model.train(training)
        try:
            yield self.model
        finally:
            self.model.train(was_training)
            self.model.zero_grad(set_to_none=True)


def finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def fmt(x: float) -> str:
    """A number short enough for a table cell."""
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def nbytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
