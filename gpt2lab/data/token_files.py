"""Token files on disk: a corpus tokenized once into ``<split>.bin`` (and a task format's ``<split>.mask.bin``),
published atomically with ``meta.json`` (sizes, content hashes, statistics) and checked whole before use."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from gpt2lab.data import formats
from gpt2lab.data.corpus import Corpus
from gpt2lab.data.formats import TaskFormat
from gpt2lab.data.token_shards import SHARD_MB, write_sharded, write_streamed
from gpt2lab.tokenizers import EOS_TOKEN, PAD_TOKEN, fingerprint
from gpt2lab.tokenizers.build import unknown_token_id

log = logging.getLogger("gpt2lab.data.datamodule")


def damaged_token_files(token_dir: Path) -> str | None:
    """What is wrong with cached token files (``"missing"`` when there are none), or None when they are whole:
    each file has the size ``meta.json`` recorded and, where it recorded one, the same content hash. A file
    cut short (a full disk, a killed copy) or altered would otherwise be trained on as it is."""
    try:
        meta = json.loads((token_dir / "meta.json").read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"meta.json unreadable: {e}"
    itemsize = np.dtype(meta["dtype"]).itemsize
    expected = meta.get("files") or {  # caches written before hashes were recorded: sizes only
        f"{split}.bin": {"bytes": s["tokens"] * itemsize} for split, s in meta["splits"].items()
    }
    for name, want in expected.items():
        path = token_dir / name
        size = path.stat().st_size if path.is_file() else None
        if size != want["bytes"]:
            return f"{name} has {'no file' if size is None else f'{size:,} bytes'}, {want['bytes']:,} expected"
        if "blake2b" in want and file_hash(path) != want["blake2b"]:
            return f"{name} does not have the content recorded in meta.json"
    return None


def file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def publish(tmp: Path, out: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` into the finished ``tmp`` directory and rename it to ``out``: atomic, so a half-written
    cache is never picked up. When another process finished first, its files are identical: ``tmp`` goes."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, out)
    except OSError:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def token_dtype(tokenizer: Tokenizer) -> type[np.unsignedinteger]:
    """The smallest unsigned type that holds every token id: uint16 up to 65,536 tokens (GPT-2's 50,257 fit)."""
    return np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.uint32


def partial_dir(out: Path) -> Path:
    """The directory beside ``out`` that its files are written in, published whole by ``publish``. One name for
    every process (one writes at a time, behind the data module's lock), so that a killed run's work is found."""
    tmp = out.with_name(f"{out.name}.partial")
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def write_token_files(
    corpus: Corpus, tokenizer: Tokenizer, out: Path, num_proc: int | None = None, shard_mb: float = SHARD_MB
) -> None:
    """Plain text's token files: per split, its documents' tokens, each document ended by an end-of-text
    (``<split>.bin``), their sizes and hashes in meta.json. Tokenized in shards by ``num_proc`` processes, in
    bounded memory and disk, and resumed after a kill where it stopped (gpt2lab/data/token_shards.py)."""
    dtype, tmp = token_dtype(tokenizer), partial_dir(out)
    for split, ds in corpus.splits.items():
        log.info("Tokenizing the %s split (%s)", split, "streamed" if corpus.streamed else f"{len(ds)} documents")
    eos, unk = tokenizer.token_to_id(EOS_TOKEN), unknown_token_id(tokenizer)
    if corpus.streamed:
        stats = write_streamed(
            corpus.splits, corpus.carve, corpus.split_names(), corpus.fingerprint, tokenizer, tmp, eos, unk, dtype,
            num_proc, shard_mb,
        )  # fmt: skip
    else:
        stats = write_sharded(corpus.splits, tokenizer, tmp, eos, unk, dtype, num_proc, shard_mb)
    files = {
        f"{split}.bin": {"bytes": (tmp / f"{split}.bin").stat().st_size, "blake2b": file_hash(tmp / f"{split}.bin")}
        for split in stats
    }
    meta = {"dtype": np.dtype(dtype).name, "tokenizer": fingerprint(tokenizer), "splits": stats, "files": files}
    publish(tmp, out, meta)


def write_example_files(
    corpus: Corpus, tokenizer: Tokenizer, out: Path, fmt: TaskFormat, window: int, packing: str, overlong: str,
    num_proc: int | None = None,
) -> None:  # fmt: skip
    """A task format's token files: per split, the packed windows (``<split>.bin``) and which of their tokens
    the loss covers (``<split>.mask.bin``, one byte per token), both recorded in meta.json for
    ``damaged_token_files``."""
    pad = tokenizer.token_to_id(PAD_TOKEN)
    pad = tokenizer.token_to_id(EOS_TOKEN) if pad is None else pad  # never scored, so any token does
    unk = unknown_token_id(tokenizer)
    dtype, tmp = token_dtype(tokenizer), partial_dir(out)
    stats, files = {}, {}
    for split, ds in corpus.splits.items():
        log.info("Tokenizing the %s split (%d %s records)", split, len(ds), fmt.name)
        encoded = ds.map(
            formats.encode_examples,
            fn_kwargs=dict(fmt=fmt, tokenizer=tokenizer, window=window, overlong=overlong),
            batched=True,
            batch_size=256,
            num_proc=num_proc,
            remove_columns=ds.column_names,
            desc=f"Tokenizing {split}",
        )
        status = np.asarray(encoded["status"])
        lengths = np.asarray(encoded["length"], dtype=np.int64)
        kept = np.flatnonzero(lengths > 0)
        window_of, offset_of, n_windows = formats.pack(lengths[kept], window, packing)
        start = np.full(len(lengths), -1, dtype=np.int64)
        start[kept] = window_of * window + offset_of
        # Written in place on disk (a split may be larger than memory), then hashed as it was written.
        size = max(n_windows * window, 1)  # np.memmap cannot map an empty file
        tokens = np.memmap(tmp / f"{split}.bin", dtype=dtype, mode="w+", shape=(size,))
        mask = np.memmap(tmp / f"{split}.mask.bin", dtype=np.uint8, mode="w+", shape=(size,))
        tokens[:], mask[:] = pad, 0
        row = 0
        for batch in encoded.select_columns(["ids", "mask"]).iter(batch_size=1024):
            for ids, scored in zip(batch["ids"], batch["mask"], strict=True):
                if start[row] >= 0:
                    tokens[start[row] : start[row] + len(ids)] = ids
                    mask[start[row] : start[row] + len(ids)] = scored
                row += 1
        n_scored = int(mask.sum(dtype=np.int64))
        n_unknown = 0 if unk is None else int(np.count_nonzero((tokens == unk) & mask.astype(bool)))
        tokens.flush()
        mask.flush()
        del tokens, mask
        for name, itemsize in ((f"{split}.bin", np.dtype(dtype).itemsize), (f"{split}.mask.bin", 1)):
            path = tmp / name
            if n_windows == 0:
                path.write_bytes(b"")
            files[name] = {"bytes": n_windows * window * itemsize, "blake2b": file_hash(path)}
        counts = {s: int(np.count_nonzero(status == i)) for i, s in enumerate(formats.EXAMPLE_STATUS)}
        stats[split] = {
            "documents": len(ds),
            "characters": int(sum(encoded["chars"])),
            "tokens": n_windows * window,  # the windows' tokens, padding included
            "unknown": n_unknown,
            "windows": n_windows,
            "examples": len(kept),
            "real_tokens": int(lengths.sum()),
            "scored_tokens": n_scored,
            "truncated": counts["truncated"],
            "dropped_too_long": counts["too long"],
            "dropped_nothing_to_score": counts["nothing to score"],
        }
    meta = {
        "dtype": np.dtype(dtype).name,
        "tokenizer": fingerprint(tokenizer),
        "format": fmt.settings() | {"window": window, "packing": packing, "overlong": overlong},
        "splits": stats,
        "files": files,
    }
    publish(tmp, out, meta)
