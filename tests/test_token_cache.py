"""Cached token files: a damaged cache is found and written again; processes starting on an empty cache together
write it once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

from gpt2lab.data import GPT2DataModule
from gpt2lab.data.token_files import damaged_token_files


def datamodule(corpus_file: Path, cache: Path) -> GPT2DataModule:
    return GPT2DataModule(
        source="files", path=str(corpus_file), max_length=16, cache_dir=str(cache),
        tokenizer={"kind": "char", "vocab_size": 64},
    )  # fmt: skip


def test_a_damaged_token_file_is_found_and_written_again(corpus_file, tmp_path, caplog):
    dm = datamodule(corpus_file, tmp_path)
    dm.prepare_data()
    token_dir = dm._token_dir
    original = {p.name: p.read_bytes() for p in token_dir.glob("*.bin")}
    assert damaged_token_files(token_dir) is None
    train = token_dir / "train.bin"
    cases = {
        "cut short": lambda: train.write_bytes(original["train.bin"][:-10]),
        "altered": lambda: train.write_bytes(bytes([original["train.bin"][0] ^ 1]) + original["train.bin"][1:]),
        "gone": train.unlink,
    }
    for what, damage in cases.items():
        damage()
        assert damaged_token_files(token_dir) is not None, what
        with caplog.at_level("WARNING"):
            caplog.clear()
            datamodule(corpus_file, tmp_path).prepare_data()
        assert f"The cached token files in {token_dir} are damaged" in caplog.text, what
        assert {p.name: p.read_bytes() for p in token_dir.glob("*.bin")} == original, what  # the same tokens again
    expected = json.loads((token_dir / "meta.json").read_text())["files"]["train.bin"]["bytes"]
    train.write_bytes(b"\0" * 3)
    assert damaged_token_files(token_dir) == f"train.bin has 3 bytes, {expected:,} expected"


def test_processes_starting_together_on_an_empty_cache_write_it_once(corpus_file, tmp_path):
    from filelock import FileLock

    scratch = datamodule(corpus_file, tmp_path / "scratch")  # the cache key does not depend on the cache's place
    scratch.prepare_data()
    cache = tmp_path / "cache"
    (cache / "tokens").mkdir(parents=True)
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
        "from gpt2lab.data import GPT2DataModule;"
        f"dm = GPT2DataModule(source='files', path={str(corpus_file)!r}, max_length=16, cache_dir={str(cache)!r},"
        " tokenizer={'kind': 'char', 'vocab_size': 64});"
        "dm.prepare_data(); print('tokens', dm.stats['train']['tokens'])"
    )
    # The test holds the lock until both processes are waiting for it: they reach the empty cache together.
    with FileLock(f"{cache / 'tokens' / scratch._token_dir.name}.lock"):
        workers = [
            subprocess.Popen(
                [sys.executable, "-u", "-c", script],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
            for _ in range(2)
        ]
        seen = ["", ""]
        for i, worker in enumerate(workers):
            while "Waiting for another process to write the token files" not in seen[i]:
                line = worker.stdout.readline()
                assert line, seen[i]  # ended before waiting
                seen[i] += line
    outputs = [seen[i] + w.communicate(timeout=300)[0] for i, w in enumerate(workers)]
    assert all(w.returncode == 0 for w in workers), outputs
    assert sum("Tokenizing the train split" in out for out in outputs) == 1, outputs  # written once
    assert sum("Loaded cached token files" in out for out in outputs) == 1, outputs  # and read by the other
    tokens = {out.rsplit("tokens ", 1)[-1].strip() for out in outputs}
    assert tokens == {str(scratch.stats["train"]["tokens"])}
    assert [p.name for p in (cache / "tokens").iterdir() if p.is_dir()] == [
        scratch._token_dir.name
    ]  # no temporary left
