"""Plain text tokenized at any size: each split cut into shards of about ``data.shard_mb`` MB of text, the shards
tokenized by worker processes, and each shard's tokens appended, in order, to its split's token file as soon as
the shards before it are in.

What this bounds, whatever the size of the corpus:

- memory: a worker holds one shard's text and tokens; the main process copies one shard in chunks;
- disk: the final token files, plus the shards tokenized ahead of the one being appended (one per worker, and one
  more), each deleted once appended. No copy of the text is made: the splits read ``datasets``' Arrow cache;
- lost work: ``progress.json`` in the staging directory records each split's appended shards and bytes. After a
  kill the next run cuts each token file back to what was recorded, keeps the shards already tokenized, and goes
  on from the first shard that was not appended. The files' hashes are taken once they are whole.

A document's tokens do not depend on the shard it falls in, so the files are byte for byte those of one pass.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tokenizers import Tokenizer

from gpt2lab.data import stream

log = logging.getLogger("gpt2lab.data.datamodule")

SHARD_MB = 32.0  # data.shard_mb's default: text per shard, the unit of a worker's memory and of resuming
ENCODE_BATCH = 1024  # documents per encode_batch call inside a shard
STATS = ("documents", "characters", "tokens", "unknown")

# Per worker process: what every shard task reads (set once by _start_worker, not sent with each task).
_worker: dict[str, Any] = {}


def plan_shards(ds: datasets.Dataset, shard_mb: float) -> list[tuple[int, int]]:
    """Contiguous row ranges of ``ds`` holding about ``shard_mb`` MB of text each, from the mean row size of the
    Arrow table under it (a split carved out of a larger table has the same mean)."""
    table = ds.data
    mean_bytes = max(1, table.nbytes // max(1, table.num_rows))
    rows = max(1, int(shard_mb * 1e6) // mean_bytes)
    return [(start, min(start + rows, len(ds))) for start in range(0, len(ds), rows)]


def tokenize_shard(
    texts: list[str], tokenizer: Tokenizer, eos: int, unk: int | None, dtype: type
) -> tuple[np.ndarray, dict[str, int]]:
    """The shard's documents' tokens, each document ended by ``eos``, and their statistics."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets (tokenizers >= 0.21)
    parts = []
    for i in range(0, len(texts), ENCODE_BATCH):
        ids: list[int] = []  # a batch's ids as Python ints (28 bytes each) at most, then 2 or 4 bytes
        for encoding in encode(texts[i : i + ENCODE_BATCH]):
            ids.extend(encoding.ids)
            ids.append(eos)
        parts.append(np.asarray(ids, dtype=dtype))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    unknown = 0 if unk is None else int(np.count_nonzero(tokens == unk))
    stats = {"documents": len(texts), "characters": sum(map(len, texts)), "tokens": len(tokens), "unknown": unknown}
    return tokens, stats


def _start_worker(splits: dict[str, datasets.Dataset], tokenizer: Tokenizer, settings: dict[str, Any]) -> None:
    _worker.update(splits=splits, tokenizer=tokenizer, **settings)


def _shard_task(task: tuple) -> None:
    """In a worker: tokenize one shard into ``<split>.<index>.bin``, then its statistics into ``.json``, each
    written under a temporary name and renamed, so that a shard on disk with its ``.json`` is whole."""
    split, index, *rows = task  # rows: (start, stop) of the split, or a streamed shard's texts
    w = _worker
    texts = rows[0] if len(rows) == 1 else w["splits"][split][rows[0] : rows[1]]["text"]
    tokens, stats = tokenize_shard(texts, w["tokenizer"], w["eos"], w["unk"], w["dtype"])
    path = shard_path(Path(w["tmp"]), split, index)
    tokens.tofile(f"{path}.part")
    os.replace(f"{path}.part", path)
    path.with_suffix(".json.part").write_text(json.dumps(stats))
    os.replace(path.with_suffix(".json.part"), path.with_suffix(".json"))


def shard_path(tmp: Path, split: str, index: int) -> Path:
    return tmp / f"{split}.shard{index:06d}.bin"


def _shard_done(tmp: Path, split: str, index: int) -> bool:
    return shard_path(tmp, split, index).with_suffix(".json").exists()


def write_sharded(
    splits: dict[str, datasets.Dataset],
    tokenizer: Tokenizer,
    tmp: Path,
    eos: int,
    unk: int | None,
    dtype: type,
    num_proc: int | None = None,
    shard_mb: float = SHARD_MB,
) -> dict[str, dict[str, int]]:
    """Write ``<split>.bin`` for every split into ``tmp``, resuming what ``tmp/progress.json`` recorded there; return
    each split's statistics. ``num_proc`` worker processes (None: every core this
    process may use); one shard in all, or ``num_proc=1``, tokenizes in this process with the tokenizer's threads."""
    plan = {split: plan_shards(ds, shard_mb) for split, ds in splits.items()}
    identity = {"plan": {s: [list(r) for r in ranges] for s, ranges in plan.items()}, "dtype": np.dtype(dtype).name}
    progress = _load_progress(tmp, identity, list(plan))
    tasks = [
        (split, i, start, stop)
        for split, ranges in plan.items()
        for i, (start, stop) in enumerate(ranges)
        if i >= progress["splits"][split]["shards"]
    ]
    done_before = sum(len(r) for r in plan.values()) - len(tasks)
    if done_before:
        log.info(
            "Resuming the token files in %s: %d of %d shards were appended before",
            tmp,
            done_before,
            done_before + len(tasks),
        )
    processes = _processes(num_proc, len(tasks))
    settings = {"tmp": str(tmp), "eos": eos, "unk": unk, "dtype": dtype}
    ahead = processes + 1  # shards tokenized ahead of the one being appended: what bounds the temporary disk
    to_run = deque(t for t in tasks if not _shard_done(tmp, t[0], t[1]))
    in_flight: deque = deque()
    report = _ProgressLog(progress)
    with _ShardRunner(splits, tokenizer, settings, processes) as run:
        for task in tasks:  # in order; each one is in to_run, in flight or already on disk
            while to_run and len(in_flight) < ahead:
                in_flight.append((to_run[0], run(to_run.popleft())))
            if in_flight and in_flight[0][0] == task:
                in_flight.popleft()[1].get()  # a worker's exception surfaces here
            _append_shard(tmp, task[0], task[1], progress)
            report(done_before + len(tasks))
    return _finish(tmp, list(plan), progress)


def write_streamed(
    streams: dict[str, datasets.IterableDataset],
    carve: tuple[float, float, int],
    split_names: list[str],
    identity: str,
    tokenizer: Tokenizer,
    tmp: Path,
    eos: int,
    unk: int | None,
    dtype: type,
    num_proc: int | None = None,
    shard_mb: float = SHARD_MB,
) -> dict[str, dict[str, int]]:
    """``write_sharded`` for a streamed corpus (``gpt2lab/data/stream.py``): each round reads about ``shard_mb`` MB
    of one stream, in order, and gives each split its documents of the round as one shard (``stream.route``
    carves validation and test out of train). progress.json records, per stream, the documents whose shards are all
    appended; a resumed run skips them and reads on. ``identity`` names the corpus (its fingerprint)."""
    settings_key = {"stream": identity, "carve": list(carve), "shard_mb": shard_mb, "dtype": np.dtype(dtype).name}
    progress = _load_progress(tmp, settings_key, split_names)
    read = progress.setdefault("read", {})  # stream -> documents whose shards are all appended
    ended = progress.setdefault("ended", [])  # streams read to their end
    if read:
        log.info("Resuming the token files in %s: %s were tokenized before", tmp,
                 ", ".join(f"{n:,} documents of the {name} stream" for name, n in read.items()))  # fmt: skip
    next_index = {split: progress["splits"][split]["shards"] for split in split_names}
    processes = _processes(num_proc, 2)
    settings = {"tmp": str(tmp), "eos": eos, "unk": unk, "dtype": dtype}
    queue: deque = deque()  # in order: ("shard", split, index, result) and ("read", stream, documents, ended)
    report = _ProgressLog(progress)
    with _ShardRunner({}, tokenizer, settings, processes) as run:

        def append_next() -> None:
            kind, *item = queue.popleft()
            if kind == "shard":
                split, index, result = item
                result.get()  # a worker's exception surfaces here
                _append_shard(tmp, split, index, progress, persist=False)
                report()
                return
            name, documents, at_end = item  # the round's shards are all in: it counts as read
            read[name] = documents
            ended.extend([name] if at_end else [])
            _write_json(tmp / "progress.json", progress)

        for name, documents, at_end, texts in _rounds(streams, carve, shard_mb, read, ended):
            for split, shard in texts.items():
                index = next_index[split]
                next_index[split] += 1
                task = (split, index, shard)
                queue.append(("shard", split, index, _Inline() if _shard_done(tmp, split, index) else run(task)))
            queue.append(("read", name, documents, at_end))
            while sum(kind == "shard" for kind, *_ in queue) > processes:  # shards ahead: what bounds the disk
                append_next()
        while queue:
            append_next()
    return _finish(tmp, split_names, progress)


def _finish(tmp: Path, split_names: list[str], progress: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Every split's file whole (a split with no documents gets an empty one), progress.json gone: the statistics."""
    for split in split_names:
        (tmp / f"{split}.bin").touch()
    (tmp / "progress.json").unlink()
    return {split: {k: progress["splits"][split][k] for k in STATS} for split in split_names}


def _rounds(
    streams: dict[str, datasets.IterableDataset],
    carve: tuple[float, float, int],
    shard_mb: float,
    read: dict[str, int],
    ended: list[str],
) -> Iterator[tuple[str, int, bool, dict[str, list[str]]]]:
    """(stream, documents read so far, whether it ended, each split's texts) for each round of about ``shard_mb``
    MB of a stream, from where ``read`` says the last run's appended rounds ended; a stream that ended is skipped."""
    for name, ds in streams.items():
        if name in ended:
            continue
        documents = read.get(name, 0)
        texts: dict[str, list[str]] = {}
        size = 0
        for text in stream.texts(ds, name, documents):
            split = stream.route(documents, *carve) if name == "train" else name
            texts.setdefault(split, []).append(text)
            documents += 1
            size += len(text)
            if size >= shard_mb * 1e6:
                yield name, documents, False, texts
                texts, size = {}, 0
        yield name, documents, True, texts


class _ProgressLog:
    """A log line at most every ``every`` seconds while shards are appended: preparing billions of tokens takes
    long enough that silence would look like a hang."""

    def __init__(self, progress: dict[str, Any], every: float = 30.0) -> None:
        self.progress, self.every = progress, every
        self.start = self.last = time.monotonic()
        self.characters_before = self._total("characters")

    def _total(self, key: str) -> int:
        return sum(record[key] for record in self.progress["splits"].values())

    def __call__(self, shards: int | None = None) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        characters = self._total("characters")
        rate = (characters - self.characters_before) / 1e6 / (now - self.start)
        done = f"{self._total('shards'):,} of {shards:,} shards" if shards else f"{self._total('shards'):,} shards"
        log.info("Tokenized %s: %.1fM characters, %.1fM tokens (%.1fM characters/s)", done, characters / 1e6,
                 self._total("tokens") / 1e6, rate)  # fmt: skip


def _processes(num_proc: int | None, tasks: int) -> int:
    """Worker processes: ``num_proc`` (None: every core this process may use), no more than there are tasks."""
    if num_proc is None:
        num_proc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(num_proc, tasks))


def _run_inline(task: tuple) -> _Inline:
    """A shard task run at once, in this process."""
    _shard_task(task)
    return _Inline()


class _Inline:
    """``apply_async``'s result for a task run at once in this process."""

    def get(self) -> None:
        return None


class _ShardRunner:
    """Runs shard tasks: a pool of worker processes, or this process when one is enough."""

    def __init__(self, splits: dict, tokenizer: Tokenizer, settings: dict, processes: int) -> None:
        self.args, self.processes, self.pool = (splits, tokenizer, settings), processes, None

    def __enter__(self):  # noqa: ANN204
        if self.processes == 1:
            _start_worker(*self.args)
            return _run_inline
        # fork where there is one (no re-import, the Arrow tables stay mapped); the workers tokenize one thread each,
        # and TOKENIZERS_PARALLELISM set at the fork keeps tokenizers from warning about its threads in the parent.
        context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # Objects the workers inherit stay shared only while nothing writes to their pages: frozen, the garbage
        # collector's passes in the workers leave them alone (without, each worker copied about 300 MB of this
        # process, torch and Lightning included).
        gc.freeze()
        try:
            self.pool = context.Pool(self.processes, initializer=_start_worker, initargs=self.args)
        finally:
            gc.unfreeze()
            if before is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
        return lambda task: self.pool.apply_async(_shard_task, (task,))

    def __exit__(self, *exc: object) -> None:
        _worker.clear()
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()


def _append_shard(tmp: Path, split: str, index: int, progress: dict[str, Any], persist: bool = True) -> None:
    """Append a tokenized shard to its split's file, record it in ``progress`` (and progress.json unless the
    caller writes it later), then delete the shard."""
    shard = shard_path(tmp, split, index)
    stats = json.loads(shard.with_suffix(".json").read_text())
    with open(tmp / f"{split}.bin", "ab") as out, open(shard, "rb") as f:
        while chunk := f.read(1 << 23):
            out.write(chunk)
        size = out.tell()
    record = progress["splits"][split]
    record.update({k: record[k] + stats[k] for k in STATS}, shards=index + 1, bytes=size)
    if persist:
        _write_json(tmp / "progress.json", progress)
    shard.unlink()
    shard.with_suffix(".json").unlink()


def _load_progress(tmp: Path, identity: dict[str, Any], split_names: list[str]) -> dict[str, Any]:
    """``tmp``'s progress when it was made for the same ``identity`` (the plan or the stream, and the settings), with
    each token file cut back to the bytes recorded; else a fresh start (anything in ``tmp`` removed)."""
    fresh = identity
    try:
        progress = json.loads((tmp / "progress.json").read_text())
    except (OSError, ValueError):
        progress = None
    if progress is None or {k: progress.get(k) for k in fresh} != fresh:
        if progress is not None:
            log.info(
                "The partial token files in %s were planned otherwise (another data.shard_mb, or the corpus "
                "changed): starting them again", tmp,
            )  # fmt: skip
        for path in tmp.iterdir():
            path.unlink()
        progress = fresh | {"splits": {s: dict.fromkeys(("shards", "bytes", *STATS), 0) for s in split_names}}
        _write_json(tmp / "progress.json", progress)
        return progress
    for split, record in progress["splits"].items():
        path = tmp / f"{split}.bin"
        with open(path, "ab") as f:
            f.truncate(record["bytes"])
        for index in range(record["shards"]):  # appended, but killed before they were deleted
            for leftover in (shard_path(tmp, split, index), shard_path(tmp, split, index).with_suffix(".json")):
                leftover.unlink(missing_ok=True)
    return progress


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.with_suffix(".part").write_text(json.dumps(value))
    os.replace(path.with_suffix(".part"), path)
