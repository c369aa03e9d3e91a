"""Tokenizers: train, load, cache and validate ``tokenizers.Tokenizer`` objects."""

from gpt2lab.tokenizers.build import (
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    TokenizerSpec,
    build_char,
    check_model_vocab,
    fingerprint,
    load_file,
    load_pretrained,
    token_byte_lengths,
    train_bpe,
    validate_tokenizer,
)

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "TokenizerSpec",
    "build_char",
    "check_model_vocab",
    "fingerprint",
    "load_file",
    "load_pretrained",
    "token_byte_lengths",
    "train_bpe",
    "validate_tokenizer",
]
