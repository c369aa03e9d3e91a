"""``python -m gpt2lab.chat``: the terminal conversation (``terminal``). The chat session itself is
``gpt2lab.inference.chat``; these names stay importable here."""

from gpt2lab.chat.terminal import converse, repl
from gpt2lab.inference.chat import Chat

__all__ = ["Chat", "converse", "repl"]
