"""A streamed corpus (``data.streaming=true``): the documents of ``data=hub`` or ``data=files`` read once, in order,
while they are tokenized, with no copy of the text on disk (``datasets``' ``IterableDataset``).

There is no table to shuffle and split, so the validation and test documents are taken out of the train split as it
streams by: ``route`` sends each document by a hash of its position, so the same documents land in the same split
on every run, however the stream is cut into shards. A dataset's own validation and test splits stream as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import datasets

from gpt2lab.errors import ConfigError

STREAMED_SOURCES = ("hub", "files")
TOKENIZER_MB = 256  # a tokenizer trained on a streamed corpus reads its first train documents, this many MB


def check(source: str, columns: dict | None, remove_duplicates: bool) -> None:
    """What ``data.streaming=true`` cannot do, as one ``ConfigError`` each."""
    if source not in STREAMED_SOURCES:
        raise ConfigError(
            f"data.streaming=true reads data=hub or data=files, and data.source is {source!r}, a corpus built on this "
            "machine: set data.streaming=false"
        )
    if columns:
        raise ConfigError(
            "data.streaming=true reads running text, and data.format reads records, which are packed whole: "
            "set data.streaming=false"
        )
    if remove_duplicates:
        raise ConfigError(
            "data.remove_duplicates=true compares every document with all the others, which a stream read once "
            "cannot: set data.remove_duplicates=false, or data.streaming=false"
        )


def fingerprint(files: list[str] | None = None, hub: list[str | None] | None = None) -> str:
    """What identifies a streamed corpus without reading it: the files' names, sizes and modification times, or
    the Hub dataset's name and config."""
    key = [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files] if files is not None else hub
    return hashlib.sha256(json.dumps(["streamed", key]).encode()).hexdigest()[:16]


def text_splits(
    raw: datasets.IterableDatasetDict,
    text_column: str,
    min_length: int,
    val_split: float,
    test_split: float,
    seed: int,
    validation_names: tuple[str, ...] = ("validation",),
) -> tuple[dict[str, datasets.IterableDataset], tuple[float, float, int]]:
    """The streams of text (a ``text`` column; empty or shorter than ``min_length`` documents left out), and the
    fractions ``route`` takes out of train for the splits the dataset does not have."""
    names = raw["train"].column_names
    if names is not None and text_column not in names:
        raise ConfigError(f"data.text_column={text_column!r} is not a column of the data; its columns are {names}")
    splits = {}
    for name in ("train", "validation", "test"):
        own = next((raw[k] for k in (validation_names if name == "validation" else (name,)) if k in raw), None)
        if own is None:
            continue
        own = own.select_columns([text_column])
        if text_column != "text":
            own = own.rename_column(text_column, "text")
        splits[name] = own.filter(lambda row: bool(row["text"]) and len(row["text"].strip()) >= max(min_length, 1))
    carve = (0.0 if "validation" in splits else val_split, 0.0 if "test" in splits else test_split, seed)
    return splits, carve


def route(index: int, val_split: float, test_split: float, seed: int) -> str:
    """The split of a streamed train split's ``index``-th document: a hash of (seed, index), read as a fraction in
    [0, 1): below ``test_split`` it goes to test, then ``val_split`` more to validation, else it stays in train."""
    u = int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "big") / 2**64
    return "test" if u < test_split else "validation" if u < test_split + val_split else "train"


def texts(ds: datasets.IterableDataset, name: str, start: int = 0) -> Iterator[str]:
    """The stream's texts from its ``start``-th document on. A reading error (a bad file, the network) becomes one
    ``ConfigError`` that names the stream and where it stopped, instead of the reader's traceback."""
    rows = iter(ds.skip(start) if start else ds)
    read = start
    while True:
        try:
            row = next(rows, None)
        except Exception as e:  # datasets raises its readers' own errors: pyarrow's, json's, the network's
            raise ConfigError(
                f"reading the {name} stream failed after {read:,} documents ({type(e).__name__}: {e}): fix or "
                "remove that file (datasets' log above names it); what was tokenized is kept, and the next run "
                "goes on from there"
            ) from e
        if row is None:
            return
        read += 1
        yield row["text"]


def train_texts(
    train: datasets.IterableDataset, carve: tuple[float, float, int], max_mb: float = TOKENIZER_MB
) -> Iterator[str]:
    """The first ``max_mb`` MB of the documents ``route`` keeps in train: what a tokenizer is trained on, where
    the whole stream would be too long to read twice."""
    read = 0
    for index, text in enumerate(texts(train, "train")):
        if route(index, *carve) == "train":
            yield text
            read += len(text)
            if read >= max_mb * 1e6:
                return
