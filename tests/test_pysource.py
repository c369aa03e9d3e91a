"""data=pysource: the Python source importable here, as a corpus: each content once, in a fixed order, capped by
data.max_bytes, its cache keyed by the file listing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2lab.data import pysource
from gpt2lab.data.corpus import load_corpus
from gpt2lab.errors import ConfigError


@pytest.fixture
def roots(tmp_path, monkeypatch) -> list[tuple[str, Path]]:
    """Two small roots standing for the standard library and a site-packages directory."""
    stdlib, packages = tmp_path / "lib", tmp_path / "site"
    files = {
        stdlib / "os_like.py": "def walk(top):\n    return top\n" * 50,
        stdlib / "json" / "decoder.py": "class Decoder:\n    pass\n" * 40,
        stdlib / "__pycache__" / "cached.py": "compiled = True\n",  # never read
        stdlib / "site-packages" / "base_only.py": "not importable from a venv\n",  # never read
        stdlib / "empty.py": "\n\n",  # no text: left out
        packages / "pkg" / "__init__.py": "from .core import run\n" * 30,
        packages / "pkg" / "core.py": "def run():\n    return 1\n" * 60,
        packages / "copy_of_decoder.py": "class Decoder:\n    pass\n" * 40,  # the same content: once
        packages / "readme.txt": "not Python\n",
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (packages / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))  # not UTF-8: left out
    found = [("stdlib", stdlib), ("site-packages", packages)]
    monkeypatch.setattr(pysource, "source_roots", lambda: found)
    return found


def test_each_python_file_once_in_a_fixed_order(roots, tmp_path):
    raw, description, fingerprint = pysource.load_pysource(None, str(tmp_path / "hf"))
    names = raw["train"]["name"]
    assert len(names) == 4  # os_like, pkg/__init__, pkg/core, one decoder
    assert sum(n in ("stdlib/json/decoder.py", "site-packages/copy_of_decoder.py") for n in names) == 1
    assert not any("__pycache__" in n or "base_only" in n or "empty" in n or "latin1" in n for n in names)
    texts = raw["train"]["text"]
    assert len(set(texts)) == len(texts)  # the decoder's copy is left out
    assert "4 distinct files of 7" in description
    again, _, same = pysource.load_pysource(None, str(tmp_path / "hf2"))  # a fresh cache: built again
    assert again["train"]["name"] == names and same == fingerprint


def test_max_bytes_keeps_a_prefix_of_that_order_and_keys_the_cache(roots, tmp_path):
    whole, _, fingerprint = pysource.load_pysource(None, str(tmp_path / "hf"))
    sizes = whole["train"]["bytes"]
    cap = sizes[0] + sizes[1] + sizes[2] - 1  # room for two documents, not three
    capped, description, capped_fingerprint = pysource.load_pysource(cap, str(tmp_path / "hf"))
    assert capped["train"]["name"] == whole["train"]["name"][:2]
    assert sum(capped["train"]["bytes"]) <= cap and f"data.max_bytes={cap:,}" in description
    assert capped_fingerprint != fingerprint


def test_a_changed_environment_is_a_new_corpus(roots, tmp_path):
    _, _, before = pysource.load_pysource(None, str(tmp_path / "hf"))
    (roots[1][1] / "pkg" / "new.py").write_text("NEW = 1\n")  # a package installed or upgraded
    raw, _, after = pysource.load_pysource(None, str(tmp_path / "hf"))
    assert after != before and "site-packages/pkg/new.py" in raw["train"]["name"]


def test_max_bytes_is_checked_and_read_by_pysource_only(roots, tmp_path):
    with pytest.raises(ConfigError, match=r"data.max_bytes=0: expected a positive number of bytes"):
        load_corpus("pysource", max_bytes=0, hf_cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data.max_bytes=1000 is read by data=pysource only"):
        load_corpus("pystdlib", max_bytes=1000, hf_cache_dir=str(tmp_path))


def test_the_real_environment_gives_the_stdlib_and_installed_packages(tmp_path):
    roots = pysource.source_roots()
    assert roots[0][0] == "stdlib" and any(label.startswith("site-packages") for label, _ in roots)
    raw, description, _ = pysource.load_pysource(3_000_000, str(tmp_path / "hf"))
    tops = {name.split("/", 1)[0] for name in raw["train"]["name"]}
    assert {"stdlib", "site-packages"} <= tops  # a capped corpus samples both
    assert any(name.startswith("site-packages/torch/") for name in raw["train"]["name"])
    assert 2_500_000 < sum(raw["train"]["bytes"]) <= 3_000_000


def test_a_run_trains_on_it(roots, train_cli, tmp_path, cache_dir):
    run = tmp_path / "run"
    result = train_cli(
        "data=pysource", "tokenizer=char", "model.context_length=16", "model.d_model=16", "model.num_heads=2",
        "model.num_layers=1", "model.d_ff=32", "data.batch_size=4", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "data.val_split=0.2",
        "data.test_split=0.2", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", "sample=null",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Corpus: Python source importable here: 4 distinct files of 7" in (run / "train.log").read_text()


def test_a_hub_dataset_neither_reachable_nor_cached_falls_back_to_a_local_corpus(monkeypatch, tmp_path, caplog):
    from gpt2lab.data import corpus

    def unavailable(*args):
        raise ConfigError("data.name='wikitext': could not load wikitext (the Hub is unreachable)")

    monkeypatch.setattr(corpus, "_load_hub", unavailable)
    monkeypatch.setattr(
        corpus.hub, "go_offline_if_unreachable", lambda: "the Hub at https://huggingface.co is unreachable"
    )
    hub_data = dict(name="wikitext", config_name="wikitext-103-raw-v1", val_split=0.0, test_split=0.0)
    with caplog.at_level("WARNING"):
        fallback = load_corpus("hub", **hub_data, offline_fallback="pystdlib", hf_cache_dir=str(tmp_path))
    assert "standard library" in fallback.description and set(fallback.splits) == {"train", "validation", "test"}
    assert "training on data=pystdlib instead (data.offline_fallback)" in caplog.text
    with pytest.raises(ConfigError, match="could not load wikitext"):  # no fallback asked for: the error
        load_corpus("hub", **hub_data, hf_cache_dir=str(tmp_path))
    monkeypatch.setattr(corpus.hub, "go_offline_if_unreachable", lambda: None)
    with pytest.raises(ConfigError, match="could not load wikitext"):  # the Hub answers: not an offline problem
        load_corpus("hub", **hub_data, offline_fallback="pystdlib", hf_cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="data.offline_fallback='files': expected pystdlib or pysource"):
        load_corpus("hub", **hub_data, offline_fallback="files", hf_cache_dir=str(tmp_path))
