"""``python -m gpt2lab.chat``. The chat session moved to ``gpt2lab.inference.chat``; these names stay importable here."""

from gpt2lab.inference.chat import Chat, repl

__all__ = ["Chat", "repl"]
