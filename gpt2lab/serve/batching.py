"""Continuous batching: every choice of every request being decoded, each in a row of the model's slots
(``gpt2lab.model.generation.DecodeSlots`` for a checkpoint, ``gpt2lab.inference.onnx.ONNXSlots`` for an ONNX
export). A new request takes a free row at the next step, while the rows already decoding go on, and a finished
one frees its row at once: nobody waits for the longest request of a batch.

Nothing here imports torch: an ONNX export is served without it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenizers import Tokenizer


class Slots(Protocol):
    """What the batcher needs of a model: ``DecodeSlots`` and ``ONNXSlots`` are such."""

    def admit(self, row: int, prompt: list[int]) -> None: ...
    def release(self, row: int) -> None: ...
    def step(self) -> None: ...
    def sample(
        self, rows: list[int], temperature: list[float], top_p: list[float], generators: list, top_k: int | None
    ) -> list[int]: ...
    def generator(self, seed: int) -> Any: ...


@dataclass
class Choice:
    """One sequence to decode: choice ``index`` of a request, with that request's settings. It ends at one of
    ``ends`` (end-of-text; a chat reply's end-of-turn), before a ``stop`` string, or after ``max_tokens``."""

    uid: str
    prompt: list[int]
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int
    stop: list[str]
    ends: list[int]
    stream: bool = True  # False: the text is wanted whole, once it ends
    tokens: list[int] = field(default_factory=list)  # the text's tokens
    sampled: int = 0  # tokens drawn, an end token included
    text: str = ""
    sent: int = 0  # characters of ``text`` already sent
    generator: Any = None

    def add(self, token: int, tokenizer: Tokenizer) -> tuple[str, str | None]:
        """Take the next token; returns the text that can be sent now, and why the choice ended (``stop``,
        ``length``) or None. Text that may yet turn out to begin a stop string, or that ends in the middle of a
        character, is held back until the next tokens tell."""
        finish, self.sampled = None, self.sampled + 1
        if token in self.ends:
            finish = "stop"
        else:
            self.tokens.append(token)
            self.text = tokenizer.decode(self.tokens)
            hit = min((self.text.find(s) for s in self.stop if s in self.text), default=-1)
            if hit >= 0:
                self.text, finish = self.text[:hit], "stop"
            elif len(self.tokens) >= self.max_tokens:
                finish = "length"
        end = len(self.text) if finish else len(self.text) - self.undecided()
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        return delta, finish

    def undecided(self) -> int:
        """Characters at the end of the text not to send yet: a partial character, or the start of a stop."""
        held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return max(held, 1 if self.text.endswith("\ufffd") else 0)


class Batcher:
    """The choices being decoded, a row each, and those waiting for a row. ``add`` may be called from another
    thread than ``step`` (LitServe's loop takes requests while a step runs): it only appends to a queue."""

    def __init__(self, slots: Slots, tokenizer: Tokenizer, rows: int, top_k: int | None = None) -> None:
        self.slots, self.tokenizer, self.rows, self.top_k = slots, tokenizer, rows, top_k
        self.waiting: deque[Choice] = deque()
        self.active: dict[int, Choice] = {}

    def add(self, choice: Choice) -> None:
        self.waiting.append(choice)

    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    def step(self) -> list[tuple[str, str, str | None, Choice]]:
        """One token for every choice being decoded (after reading the prompts of those that join now):
        ``(uid, text to send, finish reason or None, choice)`` for each choice with something to say."""
        if self.active:
            self.slots.step()
        while self.waiting and len(self.active) < self.rows:
            choice = self.waiting.popleft()
            row = min(set(range(self.rows)) - set(self.active))
            self.slots.admit(row, choice.prompt)
            choice.generator = self.slots.generator(choice.seed)
            self.active[row] = choice
        if not self.active:
            return []
        rows = sorted(self.active)
        choices = [self.active[row] for row in rows]
        tokens = self.slots.sample(
            rows, [c.temperature for c in choices], [c.top_p for c in choices], [c.generator for c in choices],
            self.top_k,
        )  # fmt: skip
        said = []
        for row, choice, token in zip(rows, choices, tokens, strict=True):
            delta, finish = choice.add(token, self.tokenizer)
            if finish:
                self.slots.release(row)
                del self.active[row]
            if delta or finish:
                said.append((choice.uid, delta, finish, choice))
        return said
