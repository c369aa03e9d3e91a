"""gpt2lab: Hydra-configured training, sweeps, evaluation and export of GPT-2 language models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_preset", "train_model"]


def __getattr__(name: str) -> Any:
    """``from gpt2lab import train_model, load_preset``, imported on first use: ``import gpt2lab`` (which every
    ``gpt2lab.*`` import runs) stays free of Hydra, torch and Lightning."""
    if name in __all__:
        from gpt2lab.train import api

        return getattr(api, name)
    raise AttributeError(f"module 'gpt2lab' has no attribute {name!r}")
