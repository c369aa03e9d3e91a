"""Lightning glue: the LightningModule and the callbacks gpt2lab adds to every run.

``GPT2LitModule`` and the schedules are imported on first use: ``gpt2lab.lit.curves`` (which ``gpt2lab runs``
reads metrics and draws with) is importable without torch and Lightning."""

from typing import Any

__all__ = ["GPT2LitModule", "warmup_cosine", "warmup_stable_decay"]


def __getattr__(name: str) -> Any:
    if name == "GPT2LitModule":
        from gpt2lab.lit.module import GPT2LitModule

        return GPT2LitModule
    if name in __all__:  # the schedules' _target_s (conf/scheduler/) name them here
        from gpt2lab.lit import optimization

        return getattr(optimization, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
