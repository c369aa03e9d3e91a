"""``python -m gpt2lab.chat ckpt=...``: talk to a trained model in the terminal.

Each reply streams token by token and continues the conversation so far, which is kept as context; when
it would no longer fit in the model's context with room for a reply, the oldest turns are dropped. A model
trained with ``data.format=chat`` has its chat template in the checkpoint: the conversation is rendered with
it (``<|user|>...<|end|><|assistant|>``), as in training, and a reply ends at its end-of-turn token. A
model trained without a chat format simply continues the text. Commands: ``/temperature 0.7``,
``/top_p 0.9``, ``/top_k 40``, ``/max_new_tokens 50``, ``/reset``, ``/help``, ``/quit``. Ctrl-C stops the
reply being generated; Ctrl-D (or ``/quit``) leaves.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from gpt2lab.config import (
    TRUSTED_TARGETS,
    config_path,
    given_on_command_line,
    null_group_overrides,
    register_schemas,
)
from gpt2lab.errors import ConfigError, report_errors
from gpt2lab.inference.generator import TextGenerator, check_inference, complete

if TYPE_CHECKING:  # imported where a checkpoint is read, as torch is (gpt2lab.generate)
    from gpt2lab.data.formats import ChatTemplate

log = logging.getLogger("gpt2lab.chat")
# The settings a /command changes, with their type and an example value
SETTABLE = {
    "temperature": (float, "0.7"),
    "top_p": (float, "0.9"),
    "top_k": (int, "40"),
    "max_new_tokens": (int, "50"),
    "repetition_penalty": (float, "1.1"),
}
HELP = (
    "Type a message and press Enter. Commands: "
    + ", ".join(f"/{name} <value>" for name in SETTABLE)
    + ", /reset (forget the conversation), /help, /quit. Ctrl-C stops a reply, Ctrl-D leaves."
)


class Chat:
    """The conversation with one model: its turns, the decoding settings, and the commands that change them."""

    def __init__(
        self, generator: TextGenerator, settings: dict[str, Any], template: ChatTemplate | None = None
    ) -> None:
        self.generator, self.settings, self.template = generator, settings, template
        self.turns: list[str] = []  # without a template: the text of each turn
        self.messages: list[dict[str, str]] = []  # with one: the {role, content} messages

    def context(self, message: str) -> str:
        """The text the reply continues: as many of the latest turns as fit with room for the reply."""
        limit = self.generator.model.config.context_length - self.settings["max_new_tokens"]
        fits = lambda text: len(self.generator.tokenizer.encode(text).ids) <= limit  # noqa: E731
        if self.template is not None:
            messages = [*self.messages, {"role": "user", "content": message}]
            while len(messages) > 1 and not fits(self.template.prompt(messages)):
                messages.pop(0)  # the oldest first
            self.messages = messages[:-1]
            return self.template.prompt(messages)
        turns = [*self.turns, message + "\n"]
        while len(turns) > 1 and not fits("".join(turns)):
            turns.pop(0)  # the oldest first
        self.turns = turns[:-1]
        return "".join(turns)

    def command(self, line: str) -> str | None:
        """Apply a /command; returns what to tell the user, or None to leave."""
        name, _, value = line[1:].partition(" ")
        if name == "quit":
            return None
        if name == "reset":
            self.turns, self.messages = [], []
            return "(the conversation is forgotten)"
        if name == "help":
            return HELP
        if name not in SETTABLE:
            return f"unknown command /{name}. {HELP}"
        try:
            kind, example = SETTABLE[name]
            new = self.settings | {name: kind(value)}
        except ValueError:
            return (
                f"/{name} {value}: expected {'a whole number' if kind is int else 'a number'}, e.g. /{name} {example}"
            )
        try:
            check_inference(new)
        except ConfigError as e:
            return f"/{name} {value}: {e}"
        self.settings = new
        return f"({name} = {new[name]})"

    def reply(self, message: str) -> str:
        """Stream the model's reply to ``message`` to stdout and remember both."""
        context = self.context(message)
        if self.template is None:
            (text,) = self.generator.generate_text(context, self.settings, out=sys.stdout)
            self.turns += [message + "\n", text + "\n"]
            return text
        text = self.complete_turn(context, out=sys.stdout)
        self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        return text

    def complete_turn(self, prompt: str, out: Any = None) -> str:
        """The assistant's turn after ``prompt``, ending at the template's end-of-turn token (end-of-text, which
        separates examples, never comes first), at a stop string, or after max_new_tokens."""
        assert self.template is not None
        tokenizer = self.generator.tokenizer
        end = tokenizer.token_to_id(self.template.end)
        return complete(self.generator.model, tokenizer, [prompt], self.settings, out=out, end_token=end)[0]


def chat(cfg: DictConfig) -> None:
    settings = OmegaConf.to_container(cfg.inference, resolve=True)
    check_inference(settings)  # before the checkpoint is read
    repl(TextGenerator(cfg.ckpt, cfg.device, cfg.paths.log_dir), settings, given_on_command_line("inference.stop"))


def repl(generator: TextGenerator, settings: dict[str, Any], stop_given: bool = True) -> None:
    """The terminal conversation (``TextGenerator.interactive_mode``) until /quit or Ctrl-D. ``stop_given``:
    the stop strings are the user's; otherwise a model with a chat template ends its turns at its end-of-turn
    token alone, not at conf/chat.yaml's blank line (which ends a plain model's reply)."""
    settings = settings | {"num_return_sequences": 1, "stream": True}
    from gpt2lab.checkpoint import saved_chat_template
    from gpt2lab.data.formats import ChatTemplate

    check_inference(settings)
    template = saved_chat_template(generator.path)
    if template and not stop_given:
        settings["stop"] = []
    session = Chat(generator, settings, ChatTemplate.from_dict(template) if template else None)
    how = f" (its chat template, {template['name']}: a reply ends at {template['end']})" if template else ""
    print(f"Chatting with {session.generator.path}{how}. {HELP}", flush=True)
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
