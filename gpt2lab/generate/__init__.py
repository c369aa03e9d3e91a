"""``python -m gpt2lab.generate``. The library moved to ``gpt2lab.inference``; these names stay importable here."""

from gpt2lab.inference.generator import Completions, TextGenerator, complete, left_padded, quoted, sample_text

__all__ = ["Completions", "TextGenerator", "complete", "left_padded", "quoted", "sample_text"]
