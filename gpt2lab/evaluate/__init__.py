"""Scoring a checkpoint: loss, perplexity and bits per byte beside gzip, bz2 and xz."""

from gpt2lab.evaluate.evaluator import Evaluator, compressor_bits_per_byte, evaluate, print_metrics

__all__ = ["Evaluator", "compressor_bits_per_byte", "evaluate", "print_metrics"]
