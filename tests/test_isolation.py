"""The suite keeps to its own caches: gpt2lab's and Hugging Face's point at a temporary directory, and a write to
the user's caches is caught (conftest.own_caches)."""

import os
from pathlib import Path

import datasets
import pytest
from conftest import CACHE_ENV, GUARDED_CACHES, TEST_CACHE, USER_CACHE_WRITES
from huggingface_hub import constants

from gpt2lab.data.corpus import load_corpus
from gpt2lab.train.api import load_preset


def test_every_cache_is_the_suites(cache_dir):
    assert os.environ["GPT2LAB_CACHE_DIR"] == str(cache_dir) == CACHE_ENV["GPT2LAB_CACHE_DIR"]
    assert load_preset("tiny").paths.cache_dir == str(cache_dir)  # a run that omits paths.cache_dir
    # datasets and huggingface_hub read these once, at import: the suite set them before
    for path in (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_MODULES_CACHE, constants.HF_HUB_CACHE):
        assert Path(path).is_relative_to(TEST_CACHE)


def test_a_corpus_loaded_without_a_cache_dir_caches_in_the_suites(tmp_path):
    (tmp_path / "notes.txt").write_text("\n\n".join(f"paragraph {i} of some text" for i in range(40)))
    cached = set(TEST_CACHE.rglob("*"))
    load_corpus("files", path=str(tmp_path / "notes.txt"))  # no hf_cache_dir: datasets' default cache
    made = set(TEST_CACHE.rglob("*")) - cached
    assert any(p.is_relative_to(datasets.config.HF_DATASETS_CACHE) for p in made)


def test_a_write_to_the_users_cache_is_caught():
    target = Path(GUARDED_CACHES[0]) / "no-such-directory" / "made-by-a-test"
    with pytest.raises(FileNotFoundError):  # audited before the call, which fails: nothing is written
        os.mkdir(target)
    with pytest.raises(FileNotFoundError):
        open(target / "file", "w")  # noqa: SIM115
    caught = USER_CACHE_WRITES[:]
    USER_CACHE_WRITES.clear()  # caught, on purpose: not this test's failure
    assert caught == [f"os.mkdir {target}", f"open {target / 'file'}"]
