"""Lightning glue: the LightningModule and the callbacks gpt2lab adds to every run.

``GPT2LitModule`` and ``warmup_cosine`` are imported on first use: ``gpt2lab.lit.curves`` (which ``gpt2lab runs``
reads metrics and draws with) is importable without torch and Lightning."""

from typing import Any

__all__ = ["GPT2LitModule", "warmup_cosine"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gpt2lab.lit import module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
