"""Plain text tokenized in shards (gpt2lab/data/token_shards.py): the token files are those of one pass whatever
the shards and processes, and a preparation killed part way resumes at the shard it reached."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gpt2lab.checkpoint import run_settings
from gpt2lab.config import compose_train
from gpt2lab.data import token_shards
from gpt2lab.data.corpus import load_corpus
from gpt2lab.data.datamodule import GPT2DataModule
from gpt2lab.errors import ConfigError
from gpt2lab.tokenizers.build import train_bpe

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 2 MB of text in 3 files, one document per paragraph, each paragraph different."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for f in range(3):
        paragraphs = [" ".join(rng.choice(WORDS, size=rng.integers(20, 200))) + f" {f}-{p}" for p in range(1500)]
        (root / f"part{f}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return root


def module(corpus_dir: Path, cache: Path, **kwargs: object) -> GPT2DataModule:
    return GPT2DataModule(
        source="files", path=str(corpus_dir), cache_dir=str(cache), max_length=32,
        tokenizer={"kind": "bpe", "vocab_size": 300, "show_progress": False}, **kwargs,
    )  # fmt: skip


def token_files(dm: GPT2DataModule) -> dict[str, bytes]:
    return {split: (dm._token_dir / f"{split}.bin").read_bytes() for split in ("train", "validation", "test")}


@pytest.fixture(scope="module")
def one_pass(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT2DataModule, dict[str, bytes]]:
    """The corpus prepared with one shard per split, in this process."""
    dm = module(corpus_dir, tmp_path_factory.mktemp("cache"), shard_mb=1000, preprocessing_num_workers=1)
    dm.prepare_data()
    return dm, token_files(dm)


def test_one_pass_is_every_document_and_its_end_of_text(one_pass: tuple[GPT2DataModule, dict[str, bytes]]) -> None:
    dm, files = one_pass
    eos = dm.tokenizer.token_to_id("<|endoftext|>")
    tokens = np.frombuffer(files["validation"], dtype=np.uint16)
    assert dm.stats["validation"]["tokens"] == len(tokens)
    assert np.count_nonzero(tokens == eos) == dm.stats["validation"]["documents"] > 0
    first = dm.tokenizer.decode(tokens[: np.flatnonzero(tokens == eos)[0]].tolist())
    assert first.split()[0] in WORDS


@pytest.mark.parametrize("shard_mb, workers", [(0.05, 2), (0.01, 1), (0.2, None)])
def test_shards_and_processes_give_the_same_files(
    corpus_dir: Path, tmp_path: Path, one_pass: tuple[GPT2DataModule, dict[str, bytes]], shard_mb: float, workers: int
) -> None:
    reference, files = one_pass
    dm = module(corpus_dir, tmp_path, shard_mb=shard_mb, preprocessing_num_workers=workers)
    dm.prepare_data()
    assert token_files(dm) == files
    assert dm.stats == reference.stats
    assert not list(tmp_path.glob("tokens/*.partial")), "the staging directory is published whole"


def test_a_shard_is_about_shard_mb_of_text(corpus_dir: Path, tmp_path: Path) -> None:
    dm = module(corpus_dir, tmp_path)
    dm.prepare_data()
    train = load_corpus("files", path=str(corpus_dir), hf_cache_dir=str(tmp_path / "hf")).splits["train"]
    ranges = token_shards.plan_shards(train, 0.1)
    sizes = [sum(len(t) for t in train[a:b]["text"]) for a, b in ranges]
    assert ranges[0][0] == 0 and ranges[-1][1] == len(train)
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False))
    assert 0.07e6 < np.median(sizes) < 0.13e6


def kill_once(run: subprocess.Popen, cache: Path, count: Callable[[dict], int], at_least: int) -> tuple[Path, int]:
    """kill -9 ``run`` as soon as ``count`` of its progress.json reaches ``at_least``; that file and the count."""
    progress, counted, deadline = None, 0, time.monotonic() + 240
    while counted < at_least and run.poll() is None and time.monotonic() < deadline:
        progress = next(cache.glob("tokens/*.partial/progress.json"), None)
        if progress is not None:
            with contextlib.suppress(OSError, ValueError, KeyError):  # replaced while being read
                counted = count(json.loads(progress.read_text()))
        time.sleep(0.005)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    return progress, counted


KILLED_RUN = """
import sys
from gpt2lab.data.datamodule import GPT2DataModule
GPT2DataModule(source="files", path=sys.argv[1], cache_dir=sys.argv[2], max_length=32, shard_mb=0.004,
               preprocessing_num_workers=int(sys.argv[3]),
               tokenizer={"kind": "bpe", "vocab_size": 300, "show_progress": False}).prepare_data()
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_preparation_resumes_at_the_shard_it_reached(
    corpus_dir: Path,
    tmp_path: Path,
    one_pass: tuple[GPT2DataModule, dict[str, bytes]],
    caplog: pytest.LogCaptureFixture,
    workers: int,
) -> None:
    """kill -9 once some shards are appended: the next run keeps them, tokenizes the rest, and its files are the
    uninterrupted run's, byte for byte."""
    reference, files = one_pass
    cache = tmp_path / "cache"
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(corpus_dir), str(cache), str(workers)])
    progress, appended = kill_once(run, cache, lambda p: sum(s["shards"] for s in p["splits"].values()), 20)
    assert appended >= 20, "the run ended before it could be killed part way"
    partial = progress.parent
    planned = sum(len(r) for r in json.loads(progress.read_text())["plan"].values())
    assert planned > appended + 10
    with open(partial / "train.bin", "ab") as f:  # a shard half appended when the kill came
        f.write(b"\x01\x02\x03")

    tokenized = []
    real = token_shards.tokenize_shard
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(token_shards, "tokenize_shard", lambda *a: tokenized.append(1) or real(*a))
    try:
        with caplog.at_level(logging.INFO, logger="gpt2lab.data.datamodule"):
            dm = module(corpus_dir, cache, shard_mb=0.004, preprocessing_num_workers=1)
            dm.prepare_data()
    finally:
        monkeypatch.undo()
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming the token files")]
    assert len(resumed) == 1 and "shards were appended before" in resumed[0]
    kept = int(resumed[0].split(": ")[1].split(" of ")[0])
    assert kept >= appended
    assert len(tokenized) <= planned - kept  # shards tokenized but not yet appended are kept too
    assert token_files(dm) == files
    assert dm.stats == reference.stats
    assert not partial.exists()


def test_a_partial_directory_from_other_settings_starts_again(
    corpus_dir: Path, tmp_path: Path, one_pass: tuple[GPT2DataModule, dict[str, bytes]]
) -> None:
    dm = module(corpus_dir, tmp_path, shard_mb=0.05, preprocessing_num_workers=1)
    dm.prepare_data()
    token_dir = dm._token_dir
    partial = token_dir.with_name(f"{token_dir.name}.partial")
    partial.mkdir()
    (partial / "progress.json").write_text(json.dumps({"plan": {"train": [[0, 5]]}, "dtype": "uint16", "splits": {}}))
    (partial / "train.bin").write_bytes(b"stale")
    for path in token_dir.iterdir():
        path.unlink()
    token_dir.rmdir()
    again = module(corpus_dir, tmp_path, shard_mb=0.05, preprocessing_num_workers=1)
    again.prepare_data()
    assert token_files(again) == one_pass[1]


def test_shard_mb_must_be_positive(corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.shard_mb=0: expected a positive size in MB"):
        module(corpus_dir, tmp_path, shard_mb=0)


# -- data.streaming=true: the documents read once, in order, while they are tokenized -----------------------------


@pytest.fixture(scope="module")
def tokenizer_file(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer for the streamed and the Arrow runs, so that their tokens compare."""
    texts = [p for f in sorted(corpus_dir.glob("*.txt")) for p in f.read_text().split("\n\n")]
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_bpe(texts, 300, show_progress=False).save(str(path))
    return path


def streamed(corpus_dir: Path, cache: Path, tokenizer_file: Path, **kwargs: object) -> GPT2DataModule:
    return GPT2DataModule(
        source="files", path=str(corpus_dir), cache_dir=str(cache), max_length=32, streaming=True,
        tokenizer={"kind": "file", "path": str(tokenizer_file)}, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_stream(corpus_dir: Path, tokenizer_file: Path, tmp_path_factory: pytest.TempPathFactory) -> GPT2DataModule:
    dm = streamed(corpus_dir, tmp_path_factory.mktemp("cache"), tokenizer_file, shard_mb=1000)
    dm.prepare_data()
    return dm


def test_a_streamed_corpus_is_every_document_once_split_by_fraction(
    corpus_dir: Path, tokenizer_file: Path, tmp_path: Path, one_stream: GPT2DataModule
) -> None:
    arrow = GPT2DataModule(
        source="files", path=str(corpus_dir), cache_dir=str(tmp_path), max_length=32,
        tokenizer={"kind": "file", "path": str(tokenizer_file)},
    )  # fmt: skip
    arrow.prepare_data()
    total = {k: sum(s[k] for s in one_stream.stats.values()) for k in ("documents", "characters", "tokens")}
    assert total == {k: sum(s[k] for s in arrow.stats.values()) for k in ("documents", "characters", "tokens")}
    assert total["documents"] == 4500
    assert set(one_stream.stats) == {"train", "validation", "test"}
    for split in ("validation", "test"):  # data.val_split and data.test_split: 5% each, by a hash of the position
        assert 0.03 < one_stream.stats[split]["documents"] / total["documents"] < 0.07
    assert list(tmp_path.glob("hf/**/*.arrow"))  # the Arrow run wrote a copy of the text ...
    assert not list(Path(one_stream.cache_dir).glob("hf/**/*.arrow"))  # ... the streamed one none


@pytest.mark.parametrize("shard_mb, workers", [(0.05, 2), (0.02, 1)])
def test_streamed_files_do_not_depend_on_shards_or_processes(
    corpus_dir: Path, tokenizer_file: Path, tmp_path: Path, one_stream: GPT2DataModule, shard_mb: float, workers: int
) -> None:
    dm = streamed(corpus_dir, tmp_path, tokenizer_file, shard_mb=shard_mb, preprocessing_num_workers=workers)
    dm.prepare_data()
    assert token_files(dm) == token_files(one_stream)
    assert dm.stats == one_stream.stats


KILLED_STREAM = """
import sys
from gpt2lab.data.datamodule import GPT2DataModule
GPT2DataModule(source="files", path=sys.argv[1], cache_dir=sys.argv[2], max_length=32, shard_mb=0.004,
               streaming=True, preprocessing_num_workers=2,
               tokenizer={"kind": "file", "path": sys.argv[3]}).prepare_data()
"""


def test_a_killed_streamed_preparation_resumes_where_it_was(
    corpus_dir: Path,
    tokenizer_file: Path,
    tmp_path: Path,
    one_stream: GPT2DataModule,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = tmp_path / "cache"
    run = subprocess.Popen([sys.executable, "-c", KILLED_STREAM, str(corpus_dir), str(cache), str(tokenizer_file)])
    _, read = kill_once(run, cache, lambda p: p["read"].get("train", 0), 500)
    assert 500 <= read < 4000, "the run ended before it could be killed part way"
    with caplog.at_level(logging.INFO, logger="gpt2lab.data.datamodule"):
        dm = streamed(corpus_dir, cache, tokenizer_file, shard_mb=0.004, preprocessing_num_workers=2)
        dm.prepare_data()
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming the token files")]
    assert len(resumed) == 1 and "documents of the train stream were tokenized before" in resumed[0]
    assert int(resumed[0].split(": ")[1].split(" documents")[0].replace(",", "")) >= read
    assert token_files(dm) == token_files(one_stream)
    assert dm.stats == one_stream.stats


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "pystdlib"}, "data.streaming=true reads data=hub or data=files, and data.source is 'pystdlib'"),
        ({"source": "files", "remove_duplicates": True}, "data.remove_duplicates=true compares every document"),
        ({"source": "files", "columns": {"messages_column": ["messages"]}}, "data.format reads records"),
    ],
)
def test_what_streaming_cannot_do_is_one_error(corpus_dir: Path, kwargs: dict, message: str) -> None:
    path = {"path": str(corpus_dir)} if kwargs["source"] == "files" else {}
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_corpus(**kwargs, **path, streaming=True)


def test_a_checkpoint_records_streaming_only_when_it_is_on() -> None:
    """Checkpoints from before data.streaming compare equal to a run that leaves it off."""
    assert "data.streaming" not in run_settings(compose_train([]), 1)
    assert run_settings(compose_train(["data.streaming=true"]), 1)["data.streaming"] is True


@pytest.mark.parametrize("tokenizer", [{"kind": "bpe", "vocab_size": 300, "show_progress": False}, None])
def test_a_bad_file_in_a_stream_is_one_error(tmp_path: Path, tokenizer_file: Path, tokenizer: dict | None) -> None:
    """Found while a tokenizer is trained on the stream, or while it is tokenized: the stream and the place."""
    (tmp_path / "data").mkdir()
    good = [json.dumps({"text": f"document {i} " * 20}) for i in range(300)]
    (tmp_path / "data" / "a.jsonl").write_text("\n".join([*good, '{"text": "broken', *good]) + "\n")
    dm = GPT2DataModule(
        source="files", path=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), max_length=32,
        streaming=True, tokenizer=tokenizer or {"kind": "file", "path": str(tokenizer_file)},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"reading the train stream failed after [\d,]+ documents"):
        dm.prepare_data()


@pytest.mark.parametrize("workers", [0, -3])
def test_preprocessing_workers_must_be_positive(corpus_dir: Path, tmp_path: Path, workers: int) -> None:
    with pytest.raises(ConfigError, match=rf"data.preprocessing_num_workers={workers}: expected a number of processes"):
        module(corpus_dir, tmp_path, preprocessing_num_workers=workers)
