"""Task formats (``data.format``): records rendered to tokens with a loss mask, then packed into windows.

``plain`` is running text (the datamodule's token stream, every token scored). The other formats turn each
record into one *example*: a list of segments, each encoded separately and marked scored or not, ending with
end-of-text. Only the answer is scored (its tokens' labels are kept; every other label is -100):

- ``chat``: ``{"messages": [{"role": "user", "content": "..."}, ...]}`` rendered with ``ChatTemplate``
  (``<|user|>`` hello ``<|end|>`` ``<|assistant|>`` hi ``<|end|>``), the assistant turns scored, their
  ``<|end|>`` included, so that the model learns to end its turn;
- ``summarization``: ``document + "\\nTL;DR: " + summary``, the summary (and end-of-text) scored;
- ``instruction``: ``prompt + "\\n\\n### Response:\\n" + completion``, the completion (and end-of-text) scored.

Segment boundaries fall where a prompt at inference ends (after the separator, after ``<|assistant|>``), so
the prompt's tokens are those of the same text encoded whole, as ``gpt2lab.chat`` and ``generate`` encode it.

Packing: examples go whole into windows of ``context + 1`` tokens, best fit, longest first, so a window holds
several short examples and little padding; an example longer than a window is truncated (the end of its
longest unscored segment first, the document or the prompt, then its start) or dropped. A window's examples
can attend to the ones before them in the window (as documents do in plain text), separated by end-of-text.

A batch stays one (B, T + 1) tensor of token ids, as for plain text, with each token that is not scored stored
as ``~id`` (negative): ``split_batch`` turns that back into inputs and labels. Every reader of a batch (the
throughput count, the device transfer, DDP) sees the same shape as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from gpt2lab.errors import ConfigError
from gpt2lab.model.cross_entropy import IGNORE_INDEX
from gpt2lab.tokenizers.chat_template import ChatTemplate

log = logging.getLogger(__name__)

FORMATS = ("plain", "chat", "summarization", "instruction")
OVERLONG = ("truncate", "drop")
SEPARATORS = {"summarization": "\nTL;DR: ", "instruction": "\n\n### Response:\n"}
SCORED = {"chat": "the assistant turns", "summarization": "the summaries", "instruction": "the completions"}
# What an example's columns are, per format: data.<key> -> its role in the record.
COLUMN_KEYS = {
    "chat": ("messages_column",),
    "summarization": ("document_column", "summary_column"),
    "instruction": ("prompt_column", "completion_column"),
}
EXAMPLE_STATUS = ("kept", "truncated", "too long", "nothing to score")  # per example, in the token pass


@dataclass(frozen=True)
class TaskFormat:
    """``data.format`` and the columns it reads; renders records as segments of (text or token, scored)."""

    name: str = "plain"
    columns: Mapping[str, Any] = field(default_factory=dict)  # data.<key> -> column name (prompt_column: a list too)
    separator: str | None = None  # null: the format's own (SEPARATORS)
    chat_template: ChatTemplate | None = None

    def __post_init__(self) -> None:
        if self.name not in FORMATS:
            raise ConfigError(
                f"data.format={self.name!r}: expected one of {', '.join(FORMATS)} "
                "(plain: running text; the others: records with a loss on the answer only, see docs/presets.md, Tasks)"
            )
        if self.name == "chat" and self.chat_template is None:
            object.__setattr__(self, "chat_template", ChatTemplate())

    @property
    def masked(self) -> bool:
        return self.name != "plain"

    @property
    def scored(self) -> str:
        """Which tokens the loss covers, in words (the evaluation says it beside the loss)."""
        return SCORED.get(self.name, "every token")

    def source_columns(self) -> dict[str, list[str]]:
        """data.<key> -> the columns of the data it names."""
        out = {}
        for key in COLUMN_KEYS.get(self.name, ()):
            value = self.columns[key]
            out[key] = [value] if isinstance(value, str) else list(value)
        return out

    def settings(self) -> dict[str, Any]:
        """What the tokens depend on, for the token cache's key."""
        return {
            "format": self.name,
            "columns": self.source_columns(),
            "separator": self._separator(),
            "chat_template": self.chat_template.to_dict() if self.chat_template else None,
        }

    def _separator(self) -> str | None:
        return self.separator if self.separator is not None else SEPARATORS.get(self.name)

    def _text(self, record: Mapping[str, Any], key: str, where: str) -> str:
        """The text of ``record``'s column(s) for data.<key>; several columns are joined by blank lines, empty
        ones left out (Alpaca's ``instruction`` and ``input``)."""
        parts = []
        for column in self.source_columns()[key]:
            value = record[column]
            if value is None:
                continue
            if not isinstance(value, str):
                raise ConfigError(
                    f"{where}: data.{key}={column!r} holds {type(value).__name__} values, not text: "
                    "point it at a column of text"
                )
            if value:
                parts.append(value)
        return "\n\n".join(parts)

    def segments(self, record: Mapping[str, Any], where: str) -> list[tuple[str, bool, bool]]:
        """``record`` as (text, is_special_token, scored) segments, end-of-text not included. ``where`` names
        the record in error messages."""
        if self.name == "chat":
            assert self.chat_template is not None
            key = COLUMN_KEYS["chat"][0]
            messages = record[self.columns[key]]
            if not isinstance(messages, list):
                raise ConfigError(
                    f"{where}: data.{key}={self.columns[key]!r} holds {type(messages).__name__}, not a list of "
                    '{"role": ..., "content": ...} messages'
                )
            t = self.chat_template
            out = []
            for i, m in enumerate(messages):
                t.check_message(m, f"{where}, message {i}")
                scored = m["role"] == t.scored_role
                out += [(t.roles[m["role"]], True, False), (m["content"], False, scored), (t.end, True, scored)]
            return out
        if self.name in ("summarization", "instruction"):
            first, second = COLUMN_KEYS[self.name]
            sep = self._separator() or ""
            return [(self._text(record, first, where), False, False), (sep, False, False)] + [
                (self._text(record, second, where), False, True)
            ]
        raise AssertionError(f"segments of data.format={self.name}")

    def plain_text(self, record: Mapping[str, Any], where: str = "a record") -> str:
        """The record's text without special tokens, for training a tokenizer on it."""
        return "".join(text for text, special, _ in self.segments(record, where) if not special)


def _mixed_fields(feature: Any, path: str = "") -> list[str]:
    """The fields datasets read as its ``Json`` feature: their values mix kinds across the records (text and
    numbers, null, lists), and each is then decoded as JSON, so that the text ``"28."`` comes back as 28.0."""
    json_feature = getattr(datasets, "Json", None)  # datasets with a Json feature (5.x)
    if json_feature is not None and isinstance(feature, json_feature):
        return [path]
    if isinstance(feature, Mapping):
        return [f for key, value in feature.items() for f in _mixed_fields(value, f"{path}.{key}" if path else key)]
    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)  # lists
    return _mixed_fields(inner, f"{path}[]") if inner is not None else []


def check_records(splits: Mapping[str, datasets.Dataset], fmt: TaskFormat, source: str) -> None:
    """Every record renders (columns of the right kind, messages with a known role and content), before any
    tokenizer is trained: a bad record is reported with its split, its number and the fix."""
    # A message of other keys makes the whole message JSON, decoded faithfully (the checks below name it); a
    # single value of mixed kinds is decoded as JSON text, where valid text may read as a number: no record
    # number could be trusted.
    mixed = [f for f in _mixed_fields(next(iter(splits.values())).features) if not f.endswith("[]")]
    if mixed:
        raise ConfigError(
            f"{source}: {', '.join(mixed)} holds values of several kinds across the records (text, and numbers, null, "
            'lists or objects): each must be text, a JSON string in quotes ("5", not 5); fix those records'
        )
    for split, ds in splits.items():
        for batch in ds.iter(batch_size=1000):
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            for row in rows:
                # numbered in the files' order, where the user can find it; the split only says where it went
                fmt.segments(
                    row, f"{source}: record {row['_record']} (from 0, in the files' order), in the {split} split"
                )


def encode_examples(
    batch: Mapping[str, list[Any]], fmt: TaskFormat, tokenizer: Tokenizer, window: int, overlong: str
) -> dict[str, list[Any]]:
    """``datasets.map`` function: each record's token ids and scored mask (end-of-text appended), fitted to
    ``window`` tokens, with its status (EXAMPLE_STATUS index) and the characters it stands for."""
    eos = tokenizer.token_to_id("<|endoftext|>")
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    segments = [fmt.segments(row, f"record {row['_record']}") for row in rows]
    texts = [text for segs in segments for text, special, _ in segs if not special]
    encoded = iter(tokenizer.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
    out: dict[str, list[Any]] = {"ids": [], "mask": [], "length": [], "status": [], "chars": []}
    for segs in segments:
        pieces = [
            ([tokenizer.token_to_id(text)] if special else next(encoded).ids, scored) for text, special, scored in segs
        ]
        pieces.append(([eos], fmt.name != "chat"))  # chat: <|end|> ends the scored turn; end-of-text separates
        if not any(text for text, _, scored in segs if scored):  # no assistant turn, an empty summary
            pieces = [(ids, False) for ids, _ in pieces]
        ids, mask, status = _fit(pieces, window, overlong)
        out["ids"].append(ids)
        out["mask"].append(mask)
        out["length"].append(len(ids))
        out["status"].append(status)
        out["chars"].append(sum(len(text) for text, special, _ in segs if not special))
    return out


def _fit(pieces: list[tuple[list[int], bool]], window: int, overlong: str) -> tuple[list[int], list[int], int]:
    """Join the pieces into ids and a mask no longer than ``window``; the status says what it took."""
    status = 0
    total = sum(len(ids) for ids, _ in pieces)
    if total > window:
        if overlong == "drop":
            return [], [], EXAMPLE_STATUS.index("too long")
        status = EXAMPLE_STATUS.index("truncated")
        unscored = [i for i, (ids, scored) in enumerate(pieces) if not scored]
        if unscored:  # the end of the longest unscored text goes first: the document, the prompt
            longest = max(unscored, key=lambda i: len(pieces[i][0]))
            ids, scored = pieces[longest]
            pieces[longest] = (ids[: max(len(ids) - (total - window), 0)], scored)
    ids = [t for piece, _ in pieces for t in piece]
    mask = [int(scored) for piece, scored in pieces for _ in piece]
    ids, mask = ids[-window:], mask[-window:]  # still too long: the start goes
    mask[0] = 0  # a window's first token is never a label
    if not any(mask):
        return [], [], EXAMPLE_STATUS.index("nothing to score")
    return ids, mask, status


def pack(lengths: np.ndarray, window: int, packing: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """Where each example goes: its window and its offset in it, and the number of windows. Packing is best fit,
    longest first (each example into the fullest window it fits in), deterministic; without packing, one
    example per window."""
    n = len(lengths)
    if not packing:
        return np.arange(n), np.zeros(n, dtype=np.int64), n
    window_of, offset_of = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    by_room: list[list[int]] = [[] for _ in range(window + 1)]  # room left -> windows with that much room
    has_room = np.zeros(window + 1, dtype=bool)
    windows = 0
    for i in np.argsort(-lengths, kind="stable"):
        size = int(lengths[i])
        fits = has_room[size:]
        if fits.any():
            room = size + int(fits.argmax())
            w = by_room[room].pop()
            has_room[room] = bool(by_room[room])
        else:
            room, w = window, windows
            windows += 1
        window_of[i], offset_of[i] = w, window - room
        left = room - size
        if left > 0:
            by_room[left].append(w)
            has_room[left] = True
    return window_of, offset_of, windows


class MaskedWindowDataset(Dataset):
    """Windows of whole examples, ``window`` tokens each (context + 1), and which tokens the loss covers. Item
    ``i`` is one int64 tensor, the tokens that are not scored stored as ``~id`` (see ``split_batch``)."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, window: int) -> None:
        self.tokens, self.mask, self.window = tokens, mask, window

    def __len__(self) -> int:
        return len(self.tokens) // self.window

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} of {len(self)}")  # also ends iteration over the dataset
        span = slice(i * self.window, (i + 1) * self.window)
        ids = torch.from_numpy(self.tokens[span].astype(np.int64))
        return torch.where(torch.from_numpy(self.mask[span].astype(bool)), ids, ~ids)

    def scored_tokens(self) -> np.ndarray:
        """The scored tokens, window by window: those an evaluation of the first windows scores, in order."""
        return self.tokens[: len(self) * self.window][self.mask[: len(self) * self.window].astype(bool)]


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) windows -> (B, T) inputs and labels, a label -100 where its token is stored as ``~id`` (not
    scored). Plain text has no negative entries: its labels are all its next tokens."""
    unscored = batch < 0
    ids = torch.where(unscored, ~batch, batch)
    return ids[:, :-1], ids[:, 1:].masked_fill(unscored[:, 1:], IGNORE_INDEX)


def cache_key(corpus_fingerprint: str, tokenizer_fingerprint: str, fmt: TaskFormat, window: int, **more: Any) -> str:
    """The token cache's key: plain text depends on the corpus and the tokenizer (as before formats existed);
    the others also on their settings and the window, which packing fills."""
    parts: list[Any] = [corpus_fingerprint, tokenizer_fingerprint]
    if fmt.masked:
        parts = [*parts, fmt.settings(), window, more]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return hashlib.sha256(f"{corpus_fingerprint}:{tokenizer_fingerprint}".encode()).hexdigest()[:16]


def training_texts(ds: datasets.Dataset, fmt: TaskFormat) -> Iterator[str]:
    """The texts a tokenizer is trained on: the running text, or each record's text without special tokens."""
    if not fmt.masked:
        yield from (row["text"] for row in ds)
        return
    for batch in ds.iter(batch_size=1000):
        for values in zip(*batch.values(), strict=True):
            yield fmt.plain_text(dict(zip(batch, values, strict=True)))
