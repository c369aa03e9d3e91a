import pytest

import gpt2lab.tokenizers.build as build
from gpt2lab.errors import ConfigError
from gpt2lab.tokenizers import EOS_TOKEN, UNK_TOKEN, TokenizerSpec, build_char, load_file, train_bpe, validate_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé — ok?",
    "class Point:\n    x: int = 0\n    y: int = 0\n",
] * 20


def test_bpe_round_trips_any_text_and_has_the_special_tokens():
    tok = train_bpe(TEXTS, vocab_size=300, show_progress=False)
    assert tok.get_vocab_size() <= 300
    for text in [*TEXTS[:3], "never seen: ∑ 🚀 \t\r\n"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.token_to_id(EOS_TOKEN) is not None
    validate_tokenizer(tok, TEXTS[1])


def test_char_tokenizer_round_trip_and_unknown_characters():
    tok = build_char(TEXTS, vocab_size=30)
    assert tok.get_vocab_size() == 30
    ids = tok.encode("def add").ids
    assert tok.decode(ids) == "def add"
    assert tok.encode("🚀").ids == [tok.token_to_id(UNK_TOKEN)]


def test_bpe_is_cached_by_corpus_and_settings(tmp_path, monkeypatch):
    spec = TokenizerSpec(kind="bpe", vocab_size=300, show_progress=False)
    first = spec.build(lambda: iter(TEXTS), "corpus-a", tmp_path)
    monkeypatch.setattr(build, "train_bpe", lambda *a, **k: pytest.fail("a cached tokenizer was trained again"))
    second = spec.build(lambda: iter(TEXTS), "corpus-a", tmp_path)
    assert second.to_str() == first.to_str()
    with pytest.raises(pytest.fail.Exception):  # another corpus is another tokenizer
        spec.build(lambda: iter(TEXTS), "corpus-b", tmp_path)


def test_file_tokenizer_loads_a_saved_tokenizer_json(tmp_path):
    tok = build_char(TEXTS, vocab_size=64)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = TokenizerSpec(kind="file", path=str(tmp_path / "tokenizer.json")).build(lambda: iter(()), "x", tmp_path)
    assert loaded.encode("def").ids == tok.encode("def").ids
    assert load_file(tmp_path).get_vocab_size() == tok.get_vocab_size()  # a directory holding tokenizer.json works too


def test_file_tokenizer_missing_or_invalid(tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer.path='.*nope.json': no such file"):
        load_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not a valid tokenizer.json"):
        load_file(tmp_path / "bad.json")


def test_pretrained_offline_names_the_offline_choice(monkeypatch):
    def offline(name):
        raise Exception("Could not connect to huggingface.co")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe of the Hub either
    monkeypatch.setattr(build.Tokenizer, "from_pretrained", offline)
    with pytest.raises(ConfigError, match=r"tokenizer.name='gpt2'.*tokenizer=bpe"):
        TokenizerSpec(kind="pretrained", name="gpt2").build(lambda: iter(()), "x", "/tmp")


@pytest.mark.parametrize(
    ("vocab_size", "kind"), [(50257, "pretrained"), (8000, "bpe"), (100_000, "bpe"), (300, "char"), (200_000, "char")]
)
def test_auto_rules(vocab_size, kind):
    assert TokenizerSpec(kind="auto", vocab_size=vocab_size).resolve_kind() == kind


def test_auto_falls_back_to_bpe_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no probe of the Hub either
    monkeypatch.setattr(build.Tokenizer, "from_pretrained", lambda name: (_ for _ in ()).throw(Exception("offline")))
    trained = []
    monkeypatch.setattr(
        build, "train_bpe", lambda texts, vocab_size, *a: trained.append(vocab_size) or build_char(texts, 64)
    )
    TokenizerSpec(kind="auto", vocab_size=50257).build(lambda: iter(TEXTS), "x", tmp_path)
    assert trained == [50257]


def test_validator_names_both_sizes_on_a_vocabulary_mismatch():
    tok = build_char(TEXTS, vocab_size=40)
    with pytest.raises(ConfigError, match=r"tokenizer vocabulary \(40\).*model.vocab_size \(32\)"):
        validate_tokenizer(tok, "def", model_vocab_size=32)


def test_unknown_kind_is_rejected():
    with pytest.raises(ConfigError, match="tokenizer.kind='wordpiece': expected one of bpe, char"):
        TokenizerSpec(kind="wordpiece")


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_token_byte_lengths_add_up_to_the_texts_bytes(kind):
    """The denominator of bits per byte: the bytes each token stands for, summed over an encoding, are the
    text's UTF-8 bytes, also where a byte-level token holds part of a multi-byte character."""
    from gpt2lab.tokenizers import build_char, token_byte_lengths, train_bpe

    text = "héllo wörld € 日本語 def f(x):\n    return x  # ok\n" * 20
    tokenizer = train_bpe([text], 300, show_progress=False) if kind == "bpe" else build_char([text], 64)
    lengths = token_byte_lengths(tokenizer)
    ids = tokenizer.encode(text).ids + [tokenizer.token_to_id("<|endoftext|>")]
    assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))  # the end-of-text token counts no bytes
