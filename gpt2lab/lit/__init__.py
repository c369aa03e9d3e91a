"""Lightning glue: the LightningModule and the callbacks gpt2lab adds to every run."""

from gpt2lab.lit.module import GPT2LitModule, warmup_cosine

__all__ = ["GPT2LitModule", "warmup_cosine"]
