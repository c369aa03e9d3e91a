"""The chat template: how a conversation becomes the text a chat model reads, and back. It travels in a
``data.format=chat`` run's checkpoint and in its exports; training (``gpt2lab.data.formats``), the terminal chat
and the server render with it. Nothing here imports torch or datasets: an ONNX export is served without them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tokenizers import Tokenizer

from gpt2lab.errors import ConfigError


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes text: each message is ``<role token> content <end token>``; a prompt ends with
    the assistant's role token, and the model's reply ends with the end token. The tokens are special tokens
    of the tokenizer; the template itself travels in the checkpoint (``to_dict``)."""

    roles: Mapping[str, str] = field(
        default_factory=lambda: {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
    )
    end: str = "<|end|>"
    scored_role: str = "assistant"
    name: str = "gpt2lab-chat-v1"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChatTemplate:
        return cls(**{**d, "roles": dict(d["roles"])})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "roles": dict(self.roles)}

    def special_tokens(self) -> list[str]:
        return [*self.roles.values(), self.end]

    def add_to(self, tokenizer: Tokenizer) -> None:
        """Give ``tokenizer`` the template's tokens (as special tokens: never split, never merged with text)."""
        tokenizer.add_special_tokens([t for t in self.special_tokens() if tokenizer.token_to_id(t) is None])

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The conversation as text, special tokens included."""
        return "".join(f"{self.roles[m['role']]}{m['content']}{self.end}" for m in messages)

    def prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The text a reply continues: the conversation so far and the assistant's role token."""
        return self.render(messages) + self.roles[self.scored_role]

    def jinja(self) -> str:
        """The template as a Jinja chat template (``tokenizer_config.json``'s ``chat_template``): transformers'
        ``apply_chat_template`` renders ``render(messages)``, or ``prompt(messages)`` with
        ``add_generation_prompt=True``, character for character, so that it gives gpt2lab's tokens. An unknown
        role or a content that is not text is refused, as ``check_message`` refuses it. Only ``{{ }}`` output and
        no text between the tags: no whitespace of the template's own reaches the model."""
        literal = json.dumps  # a Jinja string literal (Jinja reads JSON's escapes)
        roles = "{" + ", ".join(f"{literal(role)}: {literal(token)}" for role, token in self.roles.items()) + "}"
        unknown = literal(f"the chat template knows the roles {', '.join(self.roles)}, not ")
        return (
            f"{{%- set roles = {roles} -%}}"
            "{%- for message in messages -%}"
            "{%- if message['role'] not in roles -%}"
            f"{{{{ raise_exception({unknown} + message['role']) }}}}"
            "{%- endif -%}"
            "{%- if message['content'] is not string -%}"
            "{{ raise_exception('a message content must be text') }}"
            "{%- endif -%}"
            f"{{{{ roles[message['role']] + message['content'] + {literal(self.end)} }}}}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {literal(self.roles[self.scored_role])} }}}}{{%- endif -%}}"
        )

    def check_message(self, message: Any, where: str) -> None:
        """A message is ``{"role": <one of the roles>, "content": <text>}``; say which one is not, and how."""
        shape = f'each message is {{"role": {" | ".join(map(repr, self.roles))}, "content": "..."}}'
        if not isinstance(message, Mapping):
            raise ConfigError(f"{where} is {message!r}, not a message: {shape}")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise ConfigError(f"{where} has no {key!r}: {shape}")
        if message["role"] not in self.roles:
            raise ConfigError(
                f"{where} has the role {message['role']!r}, which the chat template does not know: "
                f"use one of {', '.join(self.roles)}"
            )
        if not isinstance(message["content"], str):
            raise ConfigError(f"{where}: its content is {type(message['content']).__name__}, not text: {shape}")
