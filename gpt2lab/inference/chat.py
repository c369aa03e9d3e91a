"""The chat session: a conversation with a trained model, without its terminal (``python -m gpt2lab.chat`` is
that: ``gpt2lab/chat/``).

Each reply continues the conversation so far, which is kept as context; when it would no longer fit in the
model's context with room for a reply, the oldest turns are dropped. A model trained with ``data.format=chat`` has
its chat template in the checkpoint: the conversation is rendered with it (``<|user|>...<|end|><|assistant|>``), as
in training, and a reply ends at its end-of-turn token. A model trained without a chat format simply continues the
text. Commands: ``/temperature 0.7``, ``/top_p 0.9``, ``/top_k 40``, ``/max_new_tokens 50``, ``/reset``,
``/help``, ``/quit``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TextIO

from omegaconf import DictConfig, OmegaConf

from gpt2lab.errors import ConfigError
from gpt2lab.inference.generator import TextGenerator, check_inference, complete

if TYPE_CHECKING:  # imported where a checkpoint is read, as torch is
    from gpt2lab.tokenizers.chat_template import ChatTemplate

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

    @classmethod
    def with_model_template(cls, generator: TextGenerator, settings: dict[str, Any], stop_given: bool = True) -> Chat:
        """The session ``python -m gpt2lab.chat`` holds: one streamed sequence per reply, rendered with the chat
        template of the model's checkpoint if it has one. ``stop_given``: the stop strings are the user's;
        otherwise a model with a template ends its turns at its end-of-turn token alone, not at conf/chat.yaml's
        blank line (which ends a plain model's reply)."""
        from gpt2lab.checkpoint import saved_chat_template
        from gpt2lab.tokenizers.chat_template import ChatTemplate

        settings = settings | {"num_return_sequences": 1, "stream": True}
        check_inference(settings)
        template = saved_chat_template(generator.path)
        if template and not stop_given:
            settings["stop"] = []
        return cls(generator, settings, ChatTemplate.from_dict(template) if template else None)

    def greeting(self) -> str:
        """What the session says first: the model, its template, and the commands."""
        how = (
            f" (its chat template, {self.template.name}: a reply ends at {self.template.end})" if self.template else ""
        )
        return f"Chatting with {self.generator.path}{how}. {HELP}"

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

    def reply(self, message: str, out: TextIO | None = None) -> str:
        """The model's reply to ``message`` (streamed to ``out`` as it is written, when given); both are
        remembered."""
        context = self.context(message)
        if self.template is None:
            (text,) = self.generator.generate_text(context, self.settings, out=out)
            self.turns += [message + "\n", text + "\n"]
            return text
        text = self.complete_turn(context, out=out)
        self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        return text

    def complete_turn(self, prompt: str, out: TextIO | None = None) -> str:
        """The assistant's turn after ``prompt``, ending at the template's end-of-turn token (end-of-text, which
        separates examples, never comes first), at a stop string, or after max_new_tokens."""
        assert self.template is not None
        tokenizer = self.generator.tokenizer
        end = tokenizer.token_to_id(self.template.end)
        return complete(self.generator.model, tokenizer, [prompt], self.settings, out=out, end_token=end)[0]


def chat_session(cfg: DictConfig, stop_given: bool = True) -> Chat:
    """The session ``conf/chat.yaml`` describes (``ckpt``, ``device``, ``inference``), its settings checked before
    the checkpoint is read. ``stop_given``: as for ``Chat.with_model_template``."""
    settings = OmegaConf.to_container(cfg.inference, resolve=True)
    check_inference(settings)
    generator = TextGenerator(cfg.ckpt, cfg.device, cfg.paths.log_dir)
    return Chat.with_model_template(generator, settings, stop_given)
