"""Corpora, tokenization to token files, and the LightningDataModule."""

from gpt2lab.data.corpus import Corpus, load_corpus
from gpt2lab.data.datamodule import GPT2DataModule, ResumableRandomSampler, TokenBlockDataset

__all__ = ["Corpus", "GPT2DataModule", "ResumableRandomSampler", "TokenBlockDataset", "load_corpus"]
