"""``python -m gpt2lab.chat ckpt=...``: talk to a trained model in the terminal.

Each reply streams token by token and continues the conversation so far, which is kept as context; when
it would no longer fit in the model's context with room for a reply, the oldest turns are dropped. A
model trained without a chat format simply continues the text. Commands: ``/temperature 0.7``,
``/top_p 0.9``, ``/top_k 40``, ``/max_new_tokens 50``, ``/reset``, ``/help``, ``/quit``. Ctrl-C stops the
reply being generated; Ctrl-D (or ``/quit``) leaves.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from gpt2lab.config import TRUSTED_TARGETS, config_path, null_group_overrides, register_schemas
from gpt2lab.errors import ConfigError, report_errors
from gpt2lab.generate import TextGenerator, check_inference

log = logging.getLogger("gpt2lab.chat")
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "repetition_penalty": float}
HELP = (
    "Type a message and press Enter. Commands: "
    + ", ".join(f"/{name} <value>" for name in SETTABLE)
    + ", /reset (forget the conversation), /help, /quit. Ctrl-C stops a reply, Ctrl-D leaves."
)


class Chat:
    """The conversation with one model: its turns, the decoding settings, and the commands that change them."""

    def __init__(self, generator: TextGenerator, settings: dict[str, Any]) -> None:
        self.generator, self.settings = generator, settings
        self.turns: list[str] = []

    def context(self, message: str) -> str:
        """The text the reply continues: as many of the latest turns as fit with room for the reply."""
        limit = self.generator.model.config.context_length - self.settings["max_new_tokens"]
        turns = [*self.turns, message + "\n"]
        while len(turns) > 1 and len(self.generator.tokenizer.encode("".join(turns)).ids) > limit:
            turns.pop(0)  # the oldest first
        self.turns = turns[:-1]
        return "".join(turns)

    def command(self, line: str) -> str | None:
        """Apply a /command; returns what to tell the user, or None to leave."""
        name, _, value = line[1:].partition(" ")
        if name == "quit":
            return None
        if name == "reset":
            self.turns = []
            return "(the conversation is forgotten)"
        if name == "help":
            return HELP
        if name not in SETTABLE:
            return f"unknown command /{name}. {HELP}"
        try:
            new = self.settings | {name: SETTABLE[name](value)}
            check_inference(new)
        except (ValueError, ConfigError) as e:
            return f"/{name} {value}: {e}"
        self.settings = new
        return f"({name} = {new[name]})"

    def reply(self, message: str) -> str:
        """Stream the model's reply to ``message`` to stdout and remember both."""
        context = self.context(message)
        (text,) = self.generator.generate_text(context, self.settings, out=sys.stdout)
        self.turns += [message + "\n", text + "\n"]
        return text


def chat(cfg: DictConfig) -> None:
    settings = OmegaConf.to_container(cfg.inference, resolve=True)
    repl(TextGenerator(cfg.ckpt, cfg.device, cfg.paths.log_dir), settings)


def repl(generator: TextGenerator, settings: dict[str, Any]) -> None:
    """The terminal conversation (``TextGenerator.interactive_mode``) until /quit or Ctrl-D."""
    settings = settings | {"num_return_sequences": 1, "stream": True}
    check_inference(settings)
    session = Chat(generator, settings)
    print(f"Chatting with {session.generator.path}. {HELP}", flush=True)
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
            session.reply(line)
        except KeyboardInterrupt:  # Ctrl-C while the model writes: stop this reply, keep the conversation
            print("\n(stopped)", flush=True)


register_schemas()


def main() -> None:
    """Entry point of ``python -m gpt2lab.chat``."""
    sys.argv = null_group_overrides(sys.argv)
    _main()


@hydra.main(config_path=config_path(), config_name="chat", execution_whitelist=TRUSTED_TARGETS)
@report_errors
def _main(cfg: DictConfig) -> None:
    chat(cfg)


if __name__ == "__main__":
    main()
