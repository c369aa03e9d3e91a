"""Four ways to get a tokenizer, all ending in a ``tokenizers.Tokenizer`` saved as ``tokenizer.json``.

- ``bpe``: byte-level BPE trained on the training split, cached by corpus fingerprint + settings.
- ``char``: one token per character, built from the corpus, with an unknown-character token.
- ``pretrained``: a Hub name such as ``gpt2``, or a local ``tokenizer.json``.
- ``file``: the user's own ``tokenizer.json``.
- ``auto``: the pretrained tokenizer whose vocabulary matches exactly (50257 -> gpt2) when it loads,
  BPE for 5K-100K, character level otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from gpt2lab import hub
from gpt2lab.errors import ConfigError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
KNOWN_PRETRAINED = {50257: "gpt2"}  # vocabulary size -> Hub tokenizer with exactly that vocabulary
BPE_RANGE = (5_000, 100_000)
KINDS = ("bpe", "char", "pretrained", "file", "auto")

TextSource = Callable[[], Iterator[str]]  # called afresh for each pass over the training texts


def fingerprint(tokenizer: Tokenizer) -> str:
    """A short hash of the tokenizer's full definition: equal hashes encode identically."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = True, length: int | None = None
) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE: any byte string encodes, nothing is ever unknown."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return tokenizer


def build_char(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Character-level vocabulary: the ``vocab_size - 3`` most frequent characters plus EOS, pad, unk."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    n_chars = max(vocab_size - 3, 1)
    chars = sorted(c for c, _ in counts.most_common(n_chars))  # sorted: ids do not depend on ties
    vocab = {EOS_TOKEN: 0, PAD_TOKEN: 1, UNK_TOKEN: 2} | {c: i + 3 for i, c in enumerate(chars)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOS_TOKEN, PAD_TOKEN, UNK_TOKEN])
    return tokenizer


def load_pretrained(name: str) -> Tokenizer:
    """A tokenizer by Hub name (``gpt2``), a local ``tokenizer.json``, or a model directory in Hugging Face format."""
    if Path(name).suffix == ".json" or Path(name).expanduser().exists():
        return load_file(name, key="tokenizer.name")
    offline = hub.go_offline_if_unreachable()
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as e:  # the tokenizers library raises plain Exception for network and lookup errors
        why = f"; {offline}" if offline else ""
        raise ConfigError(
            f"tokenizer.name={name!r}: could not load it from the Hugging Face Hub{why} ({type(e).__name__}: {e}). "
            "If this machine is offline, use tokenizer=bpe (trained locally on your corpus) or "
            "tokenizer=file tokenizer.path=/path/to/tokenizer.json."
        ) from e


def load_file(path: str | os.PathLike, key: str = "tokenizer.path") -> Tokenizer:
    """A ``tokenizer.json`` written by the ``tokenizers`` library (or by ``save_pretrained``); in a directory, its
    ``tokenizer.json``, else GPT-2's ``vocab.json`` and ``merges.txt`` (what a slow GPT2Tokenizer saves)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "tokenizer.json").is_file() and (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return load_vocab_merges(p / "vocab.json", p / "merges.txt")
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ConfigError(
            f"{key}={str(path)!r}: no such file; expected a tokenizer.json (or a directory with one, or with GPT-2's "
            "vocab.json and merges.txt)"
        )
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:
        raise ConfigError(f"{key}={str(path)!r} is not a valid tokenizer.json: {e}") from e


def load_vocab_merges(vocab: Path, merges: Path) -> Tokenizer:
    """GPT-2's byte-level BPE from its ``vocab.json`` and ``merges.txt``, as transformers' GPT2TokenizerFast builds it."""
    try:
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:
        raise ConfigError(f"{str(vocab.parent)!r}: vocab.json and merges.txt do not make a BPE tokenizer: {e}") from e
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if tokenizer.token_to_id(EOS_TOKEN) is not None:
        tokenizer.add_special_tokens([EOS_TOKEN])
    return tokenizer


def unknown_token_id(tokenizer: Tokenizer) -> int | None:
    """The id that stands for text outside the vocabulary, or None when there is none (byte-level BPE)."""
    return tokenizer.token_to_id(getattr(tokenizer.model, "unk_token", None) or UNK_TOKEN)


def token_byte_lengths(tokenizer: Tokenizer) -> list[int]:
    """The UTF-8 bytes each token id stands for, the denominator of bits per byte; special tokens count 0.

    A byte-level BPE token is written in an alphabet of one character per byte, so its length is its byte
    count, also for a token that holds part of a multi-byte character (which decodes to nothing whole).
    """
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
    lengths = []
    for i in range(tokenizer.get_vocab_size()):
        if i in special:
            lengths.append(0)
        elif byte_level:
            lengths.append(len(tokenizer.id_to_token(i)))
        else:
            lengths.append(len(tokenizer.decode([i]).encode("utf-8")))
    return lengths


def check_model_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """The model must have a row for every id the tokenizer can produce (more rows are fine)."""
    vocab = tokenizer.get_vocab_size()
    if vocab > model_vocab_size:
        raise ConfigError(
            f"tokenizer vocabulary ({vocab}) is larger than model.vocab_size ({model_vocab_size}): "
            f"set model.vocab_size={vocab} (or null to follow the tokenizer), or tokenizer.vocab_size<={model_vocab_size}"
        )


def validate_tokenizer(tokenizer: Tokenizer, sample: str, model_vocab_size: int | None = None) -> None:
    """Check what training relies on: an end-of-text token, ids in range, and a lossless round trip."""
    vocab = tokenizer.get_vocab_size()
    if tokenizer.token_to_id(EOS_TOKEN) is None:
        raise ConfigError(
            f"the tokenizer has no {EOS_TOKEN!r} token, which separates documents; add it as a special token"
        )
    if model_vocab_size is not None:
        check_model_vocab(tokenizer, model_vocab_size)
    ids = tokenizer.encode(sample).ids
    if ids and max(ids) >= vocab:
        raise ConfigError(f"the tokenizer produced id {max(ids)} outside its vocabulary of {vocab}")
    has_unk = tokenizer.token_to_id(UNK_TOKEN) in ids
    if not has_unk and tokenizer.decode(ids) != sample:
        raise ConfigError("the tokenizer does not round-trip text (decode(encode(x)) != x); check its decoder")


@dataclass
class TokenizerSpec:
    """What ``conf/tokenizer/*.yaml`` describes; ``build`` turns it into a ``Tokenizer``."""

    kind: str = "bpe"
    vocab_size: int = 50257
    name: str | None = None  # pretrained: Hub name or local tokenizer.json
    path: str | None = None  # file: path to tokenizer.json
    min_frequency: int = 2  # bpe: merges seen fewer times are not learned
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"tokenizer.kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.vocab_size < 4:
            raise ConfigError(f"tokenizer.vocab_size={self.vocab_size}: expected at least 4")

    def resolve_kind(self) -> str:
        """The concrete strategy; for ``auto`` this may try the Hub."""
        if self.kind != "auto":
            return self.kind
        if self.vocab_size in KNOWN_PRETRAINED:
            return "pretrained"
        return "bpe" if BPE_RANGE[0] <= self.vocab_size <= BPE_RANGE[1] else "char"

    def settings_key(self, kind: str, corpus_fingerprint: str) -> str:
        settings = {
            "kind": kind,
            "vocab_size": self.vocab_size,
            "min_frequency": self.min_frequency,
            "corpus": corpus_fingerprint,
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def build(
        self, texts: TextSource, corpus_fingerprint: str, cache_dir: str | os.PathLike, n_texts: int | None = None
    ) -> Tokenizer:
        """Load or train the tokenizer. Trained ones are cached in ``cache_dir/tokenizers/<hash>``."""
        kind = self.resolve_kind()
        if kind == "pretrained":
            name = self.name or KNOWN_PRETRAINED.get(self.vocab_size)
            if not name:
                raise ConfigError(
                    "tokenizer=pretrained needs tokenizer.name (a Hub name such as gpt2, or a tokenizer.json)"
                )
            try:
                return load_pretrained(name)
            except ConfigError as e:
                if self.kind != "auto":
                    raise
                log.warning("tokenizer=auto: %s Falling back to training a BPE tokenizer.", e)
                kind = "bpe" if self.vocab_size >= BPE_RANGE[0] else "char"
        if kind == "file":
            if not self.path:
                raise ConfigError("tokenizer=file needs tokenizer.path=/path/to/tokenizer.json")
            return load_file(self.path)
        cached = (
            Path(cache_dir).expanduser()
            / "tokenizers"
            / f"{kind}-{self.settings_key(kind, corpus_fingerprint)}"
            / "tokenizer.json"
        )
        if cached.is_file():
            log.info("Loaded cached %s tokenizer from %s", kind, cached)
            return Tokenizer.from_file(str(cached))
        log.info("Training a %s tokenizer (vocab_size=%d) on the training split", kind, self.vocab_size)
        if kind == "bpe":
            tokenizer = train_bpe(texts(), self.vocab_size, self.min_frequency, self.show_progress, n_texts)
        else:
            tokenizer = build_char(texts(), self.vocab_size)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tokenizer.save(str(tmp))
        os.replace(tmp, cached)  # atomic: a concurrent run never reads half a file
        log.info("Saved the tokenizer to %s", cached)
        return tokenizer
