"""``python -m gpt2lab.generate``. The library is ``gpt2lab.inference``; its names stay importable here, and
``TextGenerator`` here also has the chat REPL (``interactive_mode``), which is terminal I/O and so lives with the
commands (``gpt2lab.chat``). Nothing here imports torch: ``onnx=<dir>`` runs where PyTorch is not installed."""

from typing import Any

from gpt2lab.chat.terminal import repl
from gpt2lab.generate.without_torch import quoted
from gpt2lab.inference import generator
from gpt2lab.inference.generator import Completions, complete, left_padded, sample_text


class TextGenerator(generator.TextGenerator):
    """``gpt2lab.inference.generator.TextGenerator`` with ``interactive_mode``, the terminal chat."""

    def interactive_mode(self, config: dict[str, Any]) -> None:
        """Talk to the model in the terminal, as ``python -m gpt2lab.chat`` does."""
        repl(self, dict(config))


__all__ = ["Completions", "TextGenerator", "complete", "left_padded", "quoted", "sample_text"]
