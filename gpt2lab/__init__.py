"""gpt2lab: Hydra-configured training, sweeps, evaluation and export of GPT-2 language models."""

__version__ = "0.1.0"
