"""The chat session in the terminal: read a line, answer a /command or stream the model's reply, until /quit or
Ctrl-D. Ctrl-C stops the reply being written (the conversation is kept); at the prompt it only starts a fresh
line, as in Python's REPL. The session itself (context, commands, template) is ``gpt2lab.inference.chat``."""

from __future__ import annotations

import sys
from typing import Any

from gpt2lab.inference.chat import Chat
from gpt2lab.inference.generator import TextGenerator


def converse(session: Chat) -> None:
    """Talk with ``session``'s model on stdin and stdout until /quit or Ctrl-D."""
    print(session.greeting(), flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:  # Ctrl-D
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in Python's REPL
            print("\n(Ctrl-D or /quit to leave)")
            continue
        if not line:
            continue
        if line.startswith("/"):
            answer = session.command(line)
            if answer is None:
                return
            print(answer, flush=True)
            continue
        try:
            print("model> ", end="", flush=True)
            session.reply(line, out=sys.stdout)
        except KeyboardInterrupt:  # Ctrl-C while the model writes: stop this reply, keep the conversation
            print("\n(stopped)", flush=True)


def repl(generator: TextGenerator, settings: dict[str, Any], stop_given: bool = True) -> None:
    """The terminal conversation with ``generator``'s model (``TextGenerator.interactive_mode``); ``stop_given`` as
    for ``Chat.with_model_template``."""
    converse(Chat.with_model_template(generator, settings, stop_given))
