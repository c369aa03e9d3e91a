import json
import logging
from pathlib import Path
from unittest.mock import Mock

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from gpt2lab.data import GPT2DataModule, ResumableRandomSampler, TokenBlockDataset, load_corpus, token_files
from gpt2lab.data.pystdlib import pystdlib_documents
from gpt2lab.errors import ConfigError

BPE = {"kind": "bpe", "vocab_size": 300, "show_progress": False}


def make_dm(tmp_path, **kwargs) -> GPT2DataModule:
    args = {
        "source": "files",
        "max_length": 16,
        "batch_size": 4,
        "cache_dir": str(tmp_path / "cache"),
        "tokenizer": BPE,
    }
    return GPT2DataModule(**(args | kwargs))


def test_pystdlib_corpus_is_deterministic_code_and_prose():
    names, texts = pystdlib_documents()
    stdlib = [n for n in names if n.startswith("stdlib/")]
    assert names == sorted(stdlib) + sorted(n for n in names if n.startswith("pydoc/"))
    assert any(n.endswith("/os.py") for n in names) and any(n.startswith("pydoc/") for n in names)
    assert not any("/test/" in n for n in names)
    a, b = load_corpus("pystdlib"), load_corpus("pystdlib")
    assert a.fingerprint == b.fingerprint
    assert a.splits["validation"]["text"] == b.splits["validation"]["text"]
    assert set(a.splits) == {"train", "validation", "test"}
    assert "standard library" in a.description


def test_splits_are_deterministic_fractions_and_disjoint(corpus_file):
    a = load_corpus("files", path=str(corpus_file), val_split=0.1, test_split=0.1, remove_duplicates=True)
    b = load_corpus("files", path=str(corpus_file), val_split=0.1, test_split=0.1, remove_duplicates=True)
    assert a.splits["validation"]["text"] == b.splits["validation"]["text"]
    n = sum(len(s) for s in a.splits.values())
    assert abs(len(a.splits["validation"]) - 0.1 * n) <= 2
    assert not set(a.splits["train"]["text"]) & set(a.splits["validation"]["text"])
    c = load_corpus("files", path=str(corpus_file), val_split=0.1, test_split=0.1, remove_duplicates=True, split_seed=7)
    assert c.splits["validation"]["text"] != a.splits["validation"]["text"]
    assert c.fingerprint != a.fingerprint


def write_frame(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` as the kind of file ``path``'s suffix names."""
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True), ".csv": lambda: frame.to_csv(path, index=False),
     ".parquet": lambda: frame.to_parquet(path)}[path.suffix]()  # fmt: skip
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_structured_files_use_text_column(tmp_path, suffix):
    frame = pd.DataFrame({"body": [f"document number {i} " * 5 for i in range(30)], "id": range(30)})
    path = write_frame(frame, tmp_path / f"data{suffix}")
    corpus = load_corpus("files", path=str(path), text_column="body")
    assert sum(len(s) for s in corpus.splits.values()) == 30
    assert corpus.splits["train"][0]["text"].startswith("document number")
    with pytest.raises(ConfigError, match=r"data.text_column='text' is not a column.*body"):
        load_corpus("files", path=str(path), text_column="text")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_numbers_in_the_text_column_are_read_as_text_with_a_warning(tmp_path, suffix, caplog):
    path = write_frame(pd.DataFrame({"body": range(1000, 1030)}), tmp_path / f"numbers{suffix}")
    with caplog.at_level(logging.WARNING, logger="gpt2lab.data.corpus"):
        corpus = load_corpus("files", path=str(path), text_column="body")
    texts = [t for split in corpus.splits.values() for t in split["text"]]
    assert sorted(texts) == [str(i) for i in range(1000, 1030)]
    assert "data.text_column='body' holds int64 values" in caplog.text


@pytest.mark.parametrize(
    ("column", "value", "kind"), [("tags", ["a", "b"], "lists"), ("meta", {"author": "me"}, "records")]
)
def test_a_text_column_of_lists_or_records_is_refused(tmp_path, column, value, kind):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i}", column: value}) for i in range(10)))
    with pytest.raises(
        ConfigError, match=rf"data.text_column='{column}' holds {kind}.*not text.*the columns of text are \['body'\]"
    ):
        load_corpus("files", path=str(path), text_column=column)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.path=my.txt"],
            "data.path='my.txt' is read by data=files only, and data.source is 'pystdlib': add data=files",
        ),
        (
            ["data.name=wikitext"],
            "data.name='wikitext' is read by data=hub only, and data.source is 'pystdlib': add data=hub",
        ),
        (
            ["data=files", "data.path=my.txt", "data.name=wikitext"],
            "data.name='wikitext' is read by data=hub only.*'files'",
        ),
        (["data=files", "data.path=my.txt", "data.config_name=x"], "data.config_name='x' is read by data=hub only"),
        (
            ["data=wikitext2", "data.path=my.txt"],
            "data.path='my.txt' is read by data=files only, and data.source is 'hub'",
        ),
    ],
)
def test_a_data_key_the_source_does_not_read_is_an_error(compose_cfg, overrides, message):
    data = compose_cfg(*overrides, tiny=False).data
    with pytest.raises(ConfigError, match=message):
        load_corpus(data.source, path=data.path, name=data.name, config_name=data.config_name)


def test_named_hub_datasets_pass_the_key_check(compose_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: the check comes before the Hub
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read once at import
    for option in ("wikitext2", "wikitext103"):
        data = compose_cfg(f"data={option}", tiny=False).data
        with pytest.raises(ConfigError, match="could not load wikitext"):
            load_corpus(data.source, path=data.path, name=data.name, config_name=data.config_name)


def test_files_of_no_readable_kind_are_named(tmp_path):
    program = tmp_path / "ls"
    program.write_bytes(b"\x7fELF\x02\x01\x01")
    with pytest.raises(
        ConfigError,
        match=r"data.path='.*ls': .*/ls has no extension; data=files reads \.txt, \.text, \.jsonl.*\.parquet",
    ):
        load_corpus("files", path=str(program))
    (tmp_path / "notes.md").write_text("# notes")
    with pytest.raises(ConfigError, match=r"notes.md has the extension \.md, which data=files does not read"):
        load_corpus("files", path=str(tmp_path / "notes.md"))
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.csv").write_text("text\nrow")
    with pytest.raises(ConfigError, match=r"mix kinds \(csv: .*b.csv; text: .*a.txt\): .*one kind at a time"):
        load_corpus("files", path=str(tmp_path / "[ab].*"))


def test_preprocessing_min_length_and_duplicates(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(
        "\n\n".join(
            ["short"] * 5 + ["a longer paragraph of text"] * 10 + [f"unique {i} long enough" for i in range(10)]
        )
    )
    full = load_corpus("files", path=str(path), val_split=0.1, test_split=0.1)
    dedup = load_corpus("files", path=str(path), val_split=0.1, test_split=0.1, min_length=10, remove_duplicates=True)
    assert sum(map(len, full.splits.values())) == 25
    assert sum(map(len, dedup.splits.values())) == 11


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ConfigError, match=r"data.path='.*missing.txt': no such file"):
        load_corpus("files", path=str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(ConfigError, match="corpus has 0 document"):
        load_corpus("files", path=str(tmp_path / "blank.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match=r"data.path='.*empty.txt': the file is empty"):
        load_corpus("files", path=str(tmp_path / "empty.txt"))
    (tmp_path / "nothing_here").mkdir()
    with pytest.raises(ConfigError, match="the directory holds no .txt"):
        load_corpus("files", path=str(tmp_path / "nothing_here"))
    with pytest.raises(ConfigError, match="data=files needs data.path"):
        load_corpus("files")


def test_hub_dataset_offline_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(ConfigError, match=r"data.name='wikitext'.*Hub is switched off.*data=pystdlib"):
        load_corpus("hub", name="wikitext", config_name="wikitext-2-raw-v1", hf_cache_dir=str(tmp_path))


def test_token_files_are_cached_and_reused(tmp_path, corpus_file, monkeypatch):
    dm = make_dm(tmp_path, path=str(corpus_file))
    dm.setup()
    stats = dm.stats
    assert stats["train"]["tokens"] == len(dm.datasets["train"].tokens)
    assert dm.datasets["train"].tokens.dtype == np.uint16
    eos = dm.tokenizer.token_to_id("<|endoftext|>")
    assert int((np.asarray(dm.datasets["train"].tokens) == eos).sum()) == stats["train"]["documents"]
    monkeypatch.setattr(token_files, "write_token_files", lambda *a: pytest.fail("tokenized twice"))
    again = make_dm(tmp_path, path=str(corpus_file))
    again.setup()
    assert again.stats == stats
    meta = json.loads(next((tmp_path / "cache" / "tokens").glob("*/meta.json")).read_text())
    assert set(meta["splits"]) == {"train", "validation", "test"}


def test_windows_are_context_plus_one_and_contiguous():
    ds = TokenBlockDataset(np.arange(100, dtype=np.uint16), block_size=10)
    assert len(ds) == 9
    assert ds[0].tolist() == list(range(11))
    assert ds[1][0].item() == 10  # the next window starts where the previous inputs ended


def seeded_permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def test_sampler_resumes_mid_epoch():
    sampler = ResumableRandomSampler(range(20), seed=3)
    full = list(sampler)
    assert full == seeded_permutation(20, 3)  # one replica: the plain permutation, as before DDP support
    sampler.start = 8
    assert list(sampler) == full[8:]
    assert len(sampler) == 20  # the full epoch, also while resuming: Lightning counts the epoch's batches by it
    assert list(sampler) == full  # the offset applies once
    sampler.set_epoch(1)
    assert list(sampler) == seeded_permutation(20, 4) and list(sampler) != full


def test_sampler_ranks_split_one_permutation():
    ranks = [ResumableRandomSampler(range(21), seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    first, second = (list(s) for s in ranks)
    assert len(first) == len(second) == len(ranks[0]) == 10
    assert not set(first) & set(second)
    perm = seeded_permutation(21, 3)
    assert [i for pair in zip(first, second, strict=True) for i in pair] == perm[:20]  # the odd last one is dropped
    for sampler, order in zip(ranks, (first, second), strict=True):
        sampler.start = 4  # samples of this rank's share already consumed
        assert list(sampler) == order[4:]
        assert len(sampler) == 10
        sampler.set_epoch(1)
        assert list(sampler) != order


def test_train_split_too_small_for_one_batch_per_rank(tmp_path, corpus_file):
    dm = make_dm(tmp_path, path=str(corpus_file), max_length=128)
    dm.setup()
    share = len(dm.datasets["train"]) // 2
    dm.batch_size = share + 1
    dm.train_dataloader()  # one process: all the windows, enough for a batch
    progress = {"fit_loop.epoch_loop.batch_progress.current.completed": 0}
    dm.trainer = Mock(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1}, **progress)  # rank 1 of 2
    with pytest.raises(ConfigError, match=rf"\({share} for each of 2 ranks\), fewer than data.batch_size={share + 1}"):
        dm.train_dataloader()


def test_split_too_short_for_one_window(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(f"paragraph {i} with a few words" for i in range(20)))
    dm = make_dm(tmp_path, path=str(path), max_length=512)
    with pytest.raises(ConfigError, match=r"the train split has \d+ tokens, too few for one training window of 513"):
        dm.setup()


def test_a_tokenizer_that_leaves_text_unknown_warns_also_from_the_cache(tmp_path, corpus_file, monkeypatch, caplog):
    def setup_and_log() -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="gpt2lab.data.datamodule"):
            make_dm(tmp_path, path=str(corpus_file), tokenizer={"kind": "char", "vocab_size": 5}).setup()
        return caplog.text

    logged = setup_and_log()
    meta_file = next((tmp_path / "cache" / "tokens").glob("*/meta.json"))
    meta = json.loads(meta_file.read_text())
    validation = meta["splits"]["validation"]
    assert validation["unknown"] / validation["tokens"] > 0.5  # two characters known, all others unknown
    warning = f"{100 * validation['unknown'] / validation['tokens']:.1f}% of the validation tokens are <|unk|>"
    assert warning in logged and "raise tokenizer.vocab_size (now 5) or use tokenizer=bpe" in logged

    monkeypatch.setattr(token_files, "write_token_files", lambda *a: pytest.fail("tokenized twice"))
    assert warning in setup_and_log()  # from the cache
    for split in meta["splits"].values():  # token files cached before meta.json kept the count
        del split["unknown"]
    meta_file.write_text(json.dumps(meta))
    assert warning in setup_and_log()


def test_a_tokenizer_that_knows_the_text_does_not_warn(tmp_path, corpus_file, caplog):
    with caplog.at_level(logging.WARNING, logger="gpt2lab.data.datamodule"):
        dm = make_dm(tmp_path, path=str(corpus_file), tokenizer={"kind": "char", "vocab_size": 512})
        dm.setup()
    assert dm.stats["validation"]["unknown"] < 0.01 * dm.stats["validation"]["tokens"]
    assert "<|unk|>" not in caplog.text


def test_a_file_that_does_not_parse_is_refused_with_the_parsers_message(tmp_path):
    """A truncated JSONL line: the error says what the parser found and where, not only that reading failed."""
    path = tmp_path / "records.jsonl"
    lines = [json.dumps({"text": f"document {i}"}) for i in range(20)]
    path.write_text("\n".join([*lines, '{"text": "cut off']) + "\n")
    with pytest.raises(
        ConfigError, match=r"data.path='.*records.jsonl': could not read it as json: JSON parse error.*row 20"
    ):
        load_corpus("files", path=str(path), text_column="text")


def scored_labels(ds, text: list[int]) -> list[int]:
    """Where in ``text`` (the text read, end-of-text first) each label that ``ds``'s windows score stands, checking
    that every window is a stretch of ``text`` (padding only after it) and that its scored labels are its last."""
    positions = []
    for window in ds:
        unscored = window < 0
        ids = torch.where(unscored, ~window, window).tolist()
        length = len(ids) - int(unscored.flip(0).cumprod(0).sum())  # the window's tokens: padding follows them
        start = next(s for s in range(len(text)) if text[s : s + length] == ids[:length])
        scored = [k for k in range(1, length) if not unscored[k]]
        assert scored == list(range(scored[0], length)), "a window scores its last labels"
        positions += [start + k for k in scored]
    return positions


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 30])
@pytest.mark.parametrize("stride", [None, 8, 3, 1])
def test_evaluation_windows_score_every_token_once(n, stride):
    """Issue 27 #2: the final partial window is scored, with all the context before it; with a stride every token is
    scored once; the first token is predicted after an end-of-text (0 here), as lm-evaluation-harness does."""
    from gpt2lab.data.windows import SlidingWindowDataset

    tokens = np.arange(100, 100 + n, dtype=np.uint16)
    ds = SlidingWindowDataset(tokens, block_size=8, stride=stride, prefix=0)
    text = [0, *tokens.tolist()]
    assert scored_labels(ds, text) == list(range(1, n + 1))  # each token once, in order
    assert ds.scored_tokens().tolist() == tokens.tolist()
    for i in range(1, len(ds)):  # after the first window: a full context, the last stride (or fewer) scored
        window = ds[i]
        assert (window >= 0).sum() <= (stride or 8) and (window != ~0).all()
    if stride is None and n >= 8:
        assert ds[0].tolist() == [~0, *range(100, 108)]  # the non-overlapping blocks of the text read
    without = SlidingWindowDataset(tokens, block_size=8, stride=stride)  # no end-of-text: the first token is context
    assert scored_labels(without, tokens.tolist()) == list(range(1, n))


def test_evaluation_shares_give_each_window_to_one_rank():
    """Under DDP each rank scores a share: every window once (Lightning's DistributedSampler repeats some), ranks
    that run short getting a window that scores nothing, so that all run as many batches."""
    from gpt2lab.data.windows import BLANK, BlankPadded, EvalSampler, SlidingWindowDataset

    ds = BlankPadded(SlidingWindowDataset(np.arange(100, 141, dtype=np.uint16), 8, prefix=0), 9)
    assert len(ds) == 6  # 41 labels: 5 full windows and one of 1
    shares = [list(EvalSampler(ds, num_replicas=4, rank=r)) for r in range(4)]
    assert shares == [[0, 4], [1, 5], [2, BLANK], [3, BLANK]]
    assert sorted(i for share in shares for i in share if i != BLANK) == list(range(len(ds)))
    assert (ds[BLANK] < 0).all() and len(list(ds)) == len(ds)  # the padding window scores nothing
    assert list(EvalSampler(ds)) == list(range(6))  # one process: every window, in order
    tiny = BlankPadded(SlidingWindowDataset(np.arange(3, dtype=np.uint16), 8, prefix=0), 9)
    # one window for two ranks: the other gets a blank one, as without any window it would wait forever on the first
    assert [list(EvalSampler(tiny, num_replicas=2, rank=r)) for r in range(2)] == [[0], [BLANK]]


def test_a_text_scored_whole_holds_nothing_out(tmp_path):
    """Issue 27 #5: evaluating a text needs no validation or test documents, nor a full window: a single sentence
    is scored whole; the split checks of training stay."""
    path = tmp_path / "one.txt"
    path.write_text("A single sentence is enough to score.")
    corpus = load_corpus("files", path=str(path), hold_out=False)
    assert set(corpus.splits) == {"train"} and list(corpus.splits["train"]["text"]) == [path.read_text()]
    paragraphs = [f"paragraph {i} of the text" for i in range(9)]
    (tmp_path / "nine.txt").write_text("\n\n".join(paragraphs))
    in_order = load_corpus("files", path=str(tmp_path / "nine.txt"), hold_out=False)
    assert list(in_order.splits["train"]["text"]) == paragraphs  # read in the file's order, not shuffled
    with pytest.raises(ConfigError, match="too few to split off validation/test documents"):
        load_corpus("files", path=str(path))  # training's split is checked as before
    with pytest.raises(ConfigError, match="data.val_split must be > 0"):
        load_corpus("files", path=str(path), val_split=0.0)

    dm = make_dm(
        tmp_path, path=str(path), max_length=512, tokenizer={"kind": "char", "vocab_size": 512}, hold_out=False
    )
    dm.setup("test")
    loader = dm.eval_dataloader("all")
    (batch,) = list(loader)
    tokens = dm.stats["train"]["tokens"]  # the sentence's characters and its end-of-text
    assert tokens == len("A single sentence is enough to score.") + 1
    assert int((batch[:, 1:] >= 0).sum()) == tokens  # all of them scored
    with pytest.raises(ConfigError, match="too few for one training window"):
        make_dm(tmp_path, path=str(tmp_path / "nine.txt"), max_length=512, val_split=0.3).setup()
