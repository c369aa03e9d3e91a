"""``python -m gpt2lab.bench data [--gigabytes 2] [--workers N]``: preparing a corpus of a few GB through the real
path (``data=files``: ``datasets``' Arrow cache, the split, then sharded tokenization), on a synthetic corpus that
the command writes first.

It prints the time of each stage, the tokenization's MB/s in all and per worker beside the ceiling (the
``tokenizers`` library's own multi-threaded ``encode_batch`` on the first ``--ceiling-mb`` MB of the same text, in
this process), the peak memory of the processes (their proportional set size, summed, so that pages the forked
workers share count once; anonymous memory apart from the mapped files) and the peak disk under the cache
directory, against the budget of 1.1x the text plus 1.2x the final token files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from gpt2lab.bench import machine
from gpt2lab.console import table
from gpt2lab.data.corpus import load_corpus
from gpt2lab.data.datamodule import GPT2DataModule
from gpt2lab.errors import ConfigError
from gpt2lab.lit.speed import busy_share, describe_load
from gpt2lab.tokenizers.build import train_bpe

FILE_MB = 256  # synthetic corpus file size
SAMPLE_MB = 32  # the BPE tokenizer is trained on this much of the corpus
MIN_VOCAB = 512
WORDS = 30_000  # distinct pseudo-words, Zipf-distributed like a natural language's
# After each word: mostly a space; a sentence every ~15 words, a paragraph (a document) every ~400 (about 2.8 KB,
# the size of a typical web page's text in FineWeb).
SEPARATORS = (b" ", b". ", b",\n", b".\n\n")
SEPARATOR_ODDS = (0.9275, 0.0625, 0.0075, 0.0025)


def synthetic_file(task: tuple[Path, int, int]) -> None:
    """``path``: ``size`` bytes of paragraphs of pseudo-words, seeded by ``seed``; every file has the same words."""
    path, size, seed = task
    words = _words()
    pieces = np.array([w + s for w in words for s in SEPARATORS], dtype=object)
    rng = np.random.default_rng(seed)
    weights = 1.0 / (np.arange(WORDS) + 2.7)
    weights /= weights.sum()
    with open(path, "wb") as f:
        written = 0
        while written < size:
            n = 1_000_000
            idx = rng.choice(WORDS, size=n, p=weights) * len(SEPARATORS)
            idx += rng.choice(len(SEPARATORS), size=n, p=SEPARATOR_ODDS)
            chunk = b"".join(pieces[idx].tolist())[: size - written]
            f.write(chunk)
            written += len(chunk)


def _words() -> list[bytes]:
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    odds = 1.0 / np.arange(1, 27)
    odds /= odds.sum()
    return [bytes(rng.choice(letters, size=rng.integers(1, 12), p=odds)) for _ in range(WORDS)]


def write_corpus(root: Path, gigabytes: float, workers: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    total = int(gigabytes * 1e9)
    sizes = [min(FILE_MB * 10**6, total - start) for start in range(0, total, FILE_MB * 10**6)]
    paths = [root / f"part-{i:04d}.txt" for i in range(len(sizes))]
    with multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
        pool.map(synthetic_file, [(p, s, i) for i, (p, s) in enumerate(zip(paths, sizes, strict=True))])
    return paths


class Peaks(threading.Thread):
    """Samples, every ``interval`` seconds, the memory of process ``pid`` and its descendants and the disk under
    ``directory``, and keeps the peaks."""

    def __init__(self, pid: int, directory: Path, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.directory, self.interval, self.stop = pid, directory, interval, threading.Event()
        self.pss = self.anonymous = self.disk = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)

    def sample(self) -> None:
        pss = anonymous = 0
        for pid in _tree(self.pid):
            fields = _smaps_rollup(pid)
            pss += fields.get("Pss", 0)
            anonymous += fields.get("Pss_Anon", fields.get("Anonymous", 0))
        self.pss, self.anonymous = max(self.pss, pss), max(self.anonymous, anonymous)
        self.disk = max(self.disk, disk_bytes(self.directory))

    def __enter__(self) -> Peaks:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.join()
        self.sample()


def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # the process ended
                pids += [int(p) for p in task.read_text().split()]
        i += 1
    return pids


def _smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup's sizes in bytes (empty when the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return {}
    return {k.rstrip(":"): int(v) * 1024 for k, v, *_ in (line.split() for line in lines) if v.isdigit()}


def disk_bytes(directory: Path) -> int:
    """Bytes of the files under ``directory`` as the disk holds them (blocks)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):  # removed while walking
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def encode_batch_ceiling(paths: list[Path], megabytes: float, vocab: Path) -> dict[str, float]:
    """MB/s of ``tokenizers``' own ``encode_batch`` and ``encode_batch_fast`` (no offsets; the one shards use), its
    threads on every core, over the first ``megabytes`` MB of the corpus's paragraphs: the ceiling that sharded
    tokenization is measured against."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(vocab))
    with open(paths[0], "rb") as f:
        text = f.read(int(megabytes * 1e6)).decode("utf-8", errors="ignore")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    speeds = {}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tokenizer, name, None)
        if encode is None:
            continue
        start = time.perf_counter()
        for i in range(0, len(paragraphs), 4096):
            encode(paragraphs[i : i + 4096])
        speeds[name] = sum(map(len, paragraphs)) / 1e6 / (time.perf_counter() - start)
    return speeds


def prepare(settings: dict, result: Path) -> None:
    """In a new process, as ``train.py`` would: read the files into Arrow, clean and split them, then tokenize;
    each stage's seconds and the statistics into ``result``."""
    start = time.perf_counter()
    load_corpus("files", path=settings["path"], num_proc=settings["preprocessing_num_workers"],
                hf_cache_dir=str(Path(settings["cache_dir"]) / "hf"))  # fmt: skip
    read_s = time.perf_counter() - start
    dm = GPT2DataModule(**settings)
    start = time.perf_counter()
    dm.prepare_data()
    tokenize_s = time.perf_counter() - start
    token_bytes = sum(p.stat().st_size for p in dm._token_dir.glob("*.bin"))
    tokens = sum(s["tokens"] for s in dm.stats.values())
    result.write_text(json.dumps({"read_s": read_s, "tokenize_s": tokenize_s, "bytes": token_bytes, "tokens": tokens}))


def bench(args: argparse.Namespace) -> dict[str, float]:
    work = Path(args.dir or tempfile.mkdtemp(prefix="gpt2lab-bench-data-"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = args.workers or cores
    cache = work / "cache"
    try:
        start = time.perf_counter()
        paths = write_corpus(work / "corpus", args.gigabytes, workers)
        generated = time.perf_counter() - start
        text_bytes = sum(p.stat().st_size for p in paths)
        start = time.perf_counter()
        with open(paths[0], "rb") as f:
            sample = f.read(SAMPLE_MB * 10**6).decode("utf-8", errors="ignore").split("\n\n")
        vocab = work / "tokenizer.json"
        train_bpe(sample, args.vocab, show_progress=False).save(str(vocab))
        tokenizer_s = time.perf_counter() - start
        ceiling = encode_batch_ceiling(paths, args.ceiling_mb, vocab)

        settings = dict(
            source="files", path=str(work / "corpus"), preprocessing_num_workers=workers, cache_dir=str(cache),
            shard_mb=args.shard_mb, tokenizer={"kind": "file", "path": str(vocab)},
        )  # fmt: skip
        child = multiprocessing.get_context("spawn").Process(target=prepare, args=(settings, work / "result.json"))
        child.start()
        with Peaks(child.pid, cache) as peaks:
            child.join()
        if child.exitcode != 0:
            raise ConfigError(f"the preparation stopped with exit code {child.exitcode}; its output is above")
        prepared = json.loads((work / "result.json").read_text())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text_mb = text_bytes / 1e6
    budget = 1.1 * text_bytes + 1.2 * prepared["bytes"]
    return {
        "cores": cores, "workers": workers, "shard_mb": args.shard_mb, "text_mb": text_mb,
        "token_mb": prepared["bytes"] / 1e6, "tokens": prepared["tokens"], "generate_s": generated,
        "tokenizer_s": tokenizer_s, "read_split_s": prepared["read_s"], "tokenize_s": prepared["tokenize_s"],
        "mb_per_s": text_mb / prepared["tokenize_s"], "mb_per_s_per_worker": text_mb / prepared["tokenize_s"] / workers,
        "ceiling_mb_per_s": ceiling, "peak_pss_mb": peaks.pss / 1e6, "peak_anonymous_mb": peaks.anonymous / 1e6,
        "peak_disk_mb": peaks.disk / 1e6, "disk_budget_mb": budget / 1e6,
    }  # fmt: skip


def check_arguments(args: argparse.Namespace) -> None:
    """One ``ConfigError`` naming the first option out of range, before anything is written."""
    for flag, value, low in (
        ("--gigabytes", args.gigabytes, 0), ("--shard-mb", args.shard_mb, 0), ("--ceiling-mb", args.ceiling_mb, 0),
    ):  # fmt: skip
        if not value > low:
            raise ConfigError(f"{flag} {value:g}: expected a positive size")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: expected 1 or more processes")
    if args.vocab < MIN_VOCAB:
        raise ConfigError(f"--vocab {args.vocab}: expected {MIN_VOCAB} or more (a byte-level BPE starts at 256 tokens)")
    if args.dir is not None and args.dir.exists() and any(args.dir.iterdir()):
        raise ConfigError(
            f"--dir {args.dir} is not empty, and the bench removes its work directory at the end: name a new one"
        )
    if args.dir is not None and not args.dir.parent.is_dir():
        raise ConfigError(f"--dir {args.dir}: its parent directory {args.dir.parent} does not exist")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpt2lab.bench data",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--gigabytes", type=float, default=2.0, help="size of the synthetic corpus (GB of text)")
    parser.add_argument("--workers", type=int, help="tokenizing processes (default: one per core)")
    parser.add_argument("--shard-mb", type=float, default=32.0, help="data.shard_mb: MB of text per shard")
    parser.add_argument("--vocab", type=int, default=32768, help=f"BPE vocabulary, trained on the first {SAMPLE_MB} MB")
    parser.add_argument("--ceiling-mb", type=float, default=128.0, help="MB of text that encode_batch is timed on")
    parser.add_argument(
        "--dir", type=Path, help="a new work directory, removed at the end unless --keep (default: a temporary one)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the corpus and the token files")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    machine.add_busy_options(parser)
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        at_start = machine.wait_for_free_cores(args.busy_ok, args.busy_wait)
        r = bench(args)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    r["busy_at_start"] = at_start
    mb = "{:,.0f} MB".format
    rows = [
        ("text (synthetic, generated in)", f"{mb(r['text_mb'])} ({r['generate_s']:.1f} s)"),
        (
            f"BPE tokenizer (first {min(SAMPLE_MB, r['text_mb']):g} MB)",
            f"{args.vocab:,} tokens ({r['tokenizer_s']:.1f} s)",
        ),
        ("read into Arrow, cleaned, split", f"{r['read_split_s']:.1f} s"),
        ("tokenized and written", f"{r['tokenize_s']:.1f} s, {r['tokens']:,} tokens, {mb(r['token_mb'])}"),
        (
            f"tokenization, {r['workers']} processes",
            f"{r['mb_per_s']:.1f} MB/s, {r['mb_per_s_per_worker']:.2f} MB/s per process",
        ),
        *(
            (
                f"ceiling: {name}, {r['cores']} threads",
                f"{speed:.1f} MB/s (sharded: {r['mb_per_s'] / speed:.2f}x)",
            )
            for name, speed in r["ceiling_mb_per_s"].items()
        ),
        ("peak memory, all processes (PSS)", f"{mb(r['peak_pss_mb'])} ({mb(r['peak_anonymous_mb'])} anonymous)"),
        (
            "peak disk under the cache directory",
            f"{mb(r['peak_disk_mb'])} (budget {mb(r['disk_budget_mb'])}: {r['peak_disk_mb'] / r['disk_budget_mb']:.2f}x)",
        ),
    ]
    print(table(["data preparation", "measured"], rows))
    print(describe_load(at_start, busy_share()))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0
