"""The LightningDataModule: corpus, tokenizer, token files (``token_files``) and windows over them (``windows``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from filelock import FileLock, Timeout
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from gpt2lab.data import formats, stream, token_files
from gpt2lab.data.corpus import load_corpus
from gpt2lab.data.formats import OVERLONG, MaskedWindowDataset, TaskFormat
from gpt2lab.data.token_shards import SHARD_MB
from gpt2lab.data.windows import (
    BlankPadded,
    EvalSampler,
    ResumableRandomSampler,
    SlidingWindowDataset,
    TokenBlockDataset,
)
from gpt2lab.errors import ConfigError
from gpt2lab.tokenizers import EOS_TOKEN, TokenizerSpec, fingerprint, validate_tokenizer
from gpt2lab.tokenizers.build import unknown_token_id

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
MAX_UNKNOWN = 0.01  # fraction of the validation tokens that may be unknown before a run warns


class GPT2DataModule(pl.LightningDataModule):
    """Corpus -> tokenizer -> token files (cached, memory-mapped) -> window datasets -> dataloaders.

    ``hold_out=False`` (evaluating a text whole) holds out no validation or test documents: every document is in
    the train split, in its order (beside the data's own validation and test splits, if it has them)."""

    def __init__(
        self,
        source: str = "pystdlib",
        path: str | None = None,
        name: str | None = None,
        config_name: str | None = None,
        text_column: str = "text",
        sample_by: str = "paragraph",
        val_split: float = 0.05,
        test_split: float = 0.05,
        split_seed: int = 1234,
        min_length: int = 0,
        remove_duplicates: bool = False,
        max_length: int = 1024,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        preprocessing_num_workers: int | None = None,
        shard_mb: float = SHARD_MB,
        streaming: bool = False,
        cache_dir: str | None = None,
        seed: int = 1234,
        tokenizer: TokenizerSpec | dict | None = None,
        max_bytes: int | None = None,
        offline_fallback: str | None = None,
        format: str = "plain",
        messages_column: str = "messages",
        document_column: str = "document",
        summary_column: str = "summary",
        prompt_column: Any = "prompt",
        completion_column: str = "completion",
        separator: str | None = None,
        packing: bool = True,
        overlong: str = "truncate",
        hold_out: bool = True,
    ) -> None:
        super().__init__()
        # data.format: plain running text, or records whose loss covers the answer only (gpt2lab/data/formats.py)
        self.format = TaskFormat(
            format,
            columns=dict(
                messages_column=messages_column, document_column=document_column, summary_column=summary_column,
                prompt_column=prompt_column, completion_column=completion_column,
            ),
            separator=separator,
        )  # fmt: skip
        if overlong not in OVERLONG:
            raise ConfigError(
                f"data.overlong={overlong!r}: expected truncate or drop (an example longer than a window)"
            )
        self.packing, self.overlong = packing, overlong
        self.corpus_args = dict(
            source=source, path=path, name=name, config_name=config_name, text_column=text_column,
            sample_by=sample_by, val_split=val_split, test_split=test_split, split_seed=split_seed,
            min_length=min_length, remove_duplicates=remove_duplicates, num_proc=preprocessing_num_workers,
            max_bytes=max_bytes, offline_fallback=offline_fallback,
            columns=self.format.source_columns() if self.format.masked else None, hold_out=hold_out,
            streaming=streaming,
        )  # fmt: skip
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}: expected a positive number of windows per batch")
        if max_length < 1:
            raise ConfigError(f"data.max_length={max_length}: expected a positive window length (model.context_length)")
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.preprocessing_num_workers = preprocessing_num_workers
        if preprocessing_num_workers is not None and preprocessing_num_workers < 1:
            raise ConfigError(
                f"data.preprocessing_num_workers={preprocessing_num_workers}: expected a number of processes, 1 or "
                "more, or null (one per core for tokenizing)"
            )
        if not shard_mb > 0:
            raise ConfigError(
                f"data.shard_mb={shard_mb}: expected a positive size in MB of text per tokenization shard"
            )
        self.shard_mb = shard_mb
        # None: where the config's paths.cache_dir points by default ($GPT2LAB_CACHE_DIR, else ~/.cache/gpt2lab)
        self.cache_dir = Path(cache_dir or os.environ.get("GPT2LAB_CACHE_DIR") or "~/.cache/gpt2lab").expanduser()
        self.seed = seed
        self.tokenizer_spec = tokenizer if isinstance(tokenizer, TokenizerSpec) else TokenizerSpec(**(tokenizer or {}))
        self.tokenizer: Tokenizer | None = None
        self.stats: dict[str, dict[str, int]] = {}
        self.corpus_description = ""
        self._token_dir: Path | None = None
        self.datasets: dict[str, TokenBlockDataset | MaskedWindowDataset] = {}

    @property
    def chat_template(self) -> formats.ChatTemplate | None:
        """The chat template of data.format=chat (its tokens are in the tokenizer), saved with the checkpoints."""
        return self.format.chat_template

    # -- preparation: runs once per process; every step is cached on disk -------------------------
    def prepare_data(self) -> None:
        if self.tokenizer is not None:
            return
        corpus = load_corpus(**self.corpus_args, hf_cache_dir=str(self.cache_dir / "hf"))
        self.corpus_description = corpus.description
        log.info("Corpus: %s (fingerprint %s)", corpus.description, corpus.fingerprint)
        if self.format.masked:  # a bad record is reported before any tokenizer is trained
            formats.check_records(corpus.splits, self.format, corpus.description)
        train = corpus.splits["train"]
        if corpus.streamed:  # a tokenizer trained here reads the first documents (stream.TOKENIZER_MB)
            texts, n_texts = (lambda: stream.train_texts(train, corpus.carve)), None
        else:
            texts, n_texts = (lambda: formats.training_texts(train, self.format)), len(train)
        tokenizer = self.tokenizer_spec.build(
            texts=texts, corpus_fingerprint=corpus.fingerprint, cache_dir=self.cache_dir, n_texts=n_texts
        )
        validate_tokenizer(tokenizer, next(texts())[:2000])
        if self.chat_template is not None:
            self.chat_template.add_to(tokenizer)
        key = formats.cache_key(
            corpus.fingerprint, fingerprint(tokenizer), self.format, self.max_length + 1,
            packing=self.packing, overlong=self.overlong,
        )  # fmt: skip
        self._token_dir = self.cache_dir / "tokens" / key
        self._token_dir.parent.mkdir(parents=True, exist_ok=True)
        # One process builds the token files (DDP ranks and sweep workers may start on an empty cache together);
        # the others wait for it and read its files.
        lock = FileLock(f"{self._token_dir}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("Waiting for another process to write the token files %s", self._token_dir)
            lock.acquire()
        try:
            problem = token_files.damaged_token_files(self._token_dir)
            if problem is None:
                log.info("Loaded cached token files from %s", self._token_dir)
            else:
                if (self._token_dir / "meta.json").exists():
                    log.warning(
                        "The cached token files in %s are damaged (%s): writing them again", self._token_dir, problem
                    )
                    shutil.rmtree(self._token_dir)
                if self.format.masked:
                    token_files.write_example_files(
                        corpus, tokenizer, self._token_dir, self.format, self.max_length + 1, self.packing,
                        self.overlong, self.preprocessing_num_workers,
                    )  # fmt: skip
                else:
                    token_files.write_token_files(
                        corpus, tokenizer, self._token_dir, self.preprocessing_num_workers, self.shard_mb
                    )
        finally:
            lock.release()
        self.stats = json.loads((self._token_dir / "meta.json").read_text())["splits"]
        self.tokenizer = tokenizer
        self._log_stats()
        self._warn_unknown()

    def _warn_unknown(self) -> None:
        """Warn when the tokenizer maps more than MAX_UNKNOWN of the validation text to its unknown token."""
        assert self.tokenizer is not None and self._token_dir is not None
        unk = unknown_token_id(self.tokenizer)
        validation = self.stats.get("validation", {"tokens": 0})  # none when no documents are held out
        if unk is None or not validation["tokens"]:
            return
        unknown = validation.get("unknown")
        if unknown is None:  # token files cached before the count was kept in meta.json
            meta = json.loads((self._token_dir / "meta.json").read_text())
            tokens = np.memmap(self._token_dir / "validation.bin", dtype=meta["dtype"], mode="r")
            unknown = int(np.count_nonzero(tokens == unk))
        rate = unknown / validation["tokens"]
        if rate > MAX_UNKNOWN:
            log.warning(
                "%.1f%% of the validation tokens are %s, text the tokenizer has no token for: "
                "raise tokenizer.vocab_size (now %d) or use tokenizer=bpe, which has a token for every byte",
                100 * rate, self.tokenizer.id_to_token(unk), self.tokenizer_spec.vocab_size,
            )  # fmt: skip

    def _log_stats(self) -> None:
        if self.format.masked:
            self._log_example_stats()
            return
        for split, s in self.stats.items():
            log.info(
                "%-10s %8d documents %12d characters %11d tokens (%.2f chars/token)",
                split, s["documents"], s["characters"], s["tokens"], s["characters"] / max(s["tokens"], 1),
            )  # fmt: skip

    def _log_example_stats(self) -> None:
        window = self.max_length + 1
        for split, s in self.stats.items():
            log.info(
                "%-10s %8d examples in %d windows of %d tokens: %d real tokens, packing efficiency %.1f%% "
                "(real / window tokens), %d scored (%s)",
                split, s["examples"], s["windows"], window, s["real_tokens"],
                100 * s["real_tokens"] / max(s["tokens"], 1), s["scored_tokens"], self.format.scored,
            )  # fmt: skip
            if s["truncated"] or s["dropped_too_long"]:
                how = (
                    "truncated (the end of the document or prompt first, else the start of the example)"
                    if self.overlong == "truncate"
                    else "dropped (data.overlong=drop)"
                )
                log.warning(
                    "%-10s %d of %d records were longer than a window of %d tokens (model.context_length + 1) "
                    "and were %s",
                    split, s["truncated"] + s["dropped_too_long"], s["documents"], window, how,
                )  # fmt: skip
            if s["dropped_nothing_to_score"]:
                log.warning(
                    "%-10s %d of %d records were dropped: they have nothing to score (%s empty or missing)",
                    split, s["dropped_nothing_to_score"], s["documents"], self.format.scored,
                )  # fmt: skip

    # -- setup: memory-map the token files ---------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Memory-map the token files. Unless ``stage="test"`` (scoring, which any non-empty split allows), train and
        validation must each hold a full window of training."""
        if self.datasets:
            return
        self.prepare_data()
        assert self._token_dir is not None
        dtype = json.loads((self._token_dir / "meta.json").read_text())["dtype"]

        def read(path: Path, dtype: str) -> np.ndarray:
            return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)

        for split in SPLITS:
            path = self._token_dir / f"{split}.bin"
            if not path.is_file():
                continue
            if self.format.masked:
                mask = read(self._token_dir / f"{split}.mask.bin", "uint8")
                self.datasets[split] = MaskedWindowDataset(read(path, dtype), mask, self.max_length + 1)
            else:
                self.datasets[split] = TokenBlockDataset(read(path, dtype), self.max_length)
        if stage == "test":
            return
        for split in ("train", "validation"):
            n = len(self.datasets[split].tokens)
            if self.format.masked and len(self.datasets[split]) == 0:
                raise ConfigError(
                    f"the {split} split has no {self.format.name} example with anything to score "
                    f"({self.stats[split]['documents']} records): add records"
                    + (", or raise data.val_split" if split == "validation" else "")
                )
            if len(self.datasets[split]) == 0:
                raise ConfigError(
                    f"the {split} split has {n} tokens, too few for one training window of {self.max_length + 1} "
                    f"(model.context_length + 1): add data, lower model.context_length"
                    + (", or raise data.val_split" if split == "validation" else "")
                )

    # -- dataloaders -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Under DDP each rank samples its own share; these are the arguments Lightning would have given
        # the DistributedSampler it puts in place of any other sampler.
        ranks = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {"num_replicas": 1, "rank": 0}
        sampler = ResumableRandomSampler(self.datasets["train"], self.seed, **ranks)
        if trainer is not None:
            # On resume Lightning restores the loop's progress before asking for dataloaders; skip the
            # batches of this epoch that the checkpointed run had already trained on (on every rank,
            # the same number of batches of data.batch_size from its own share).
            done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            sampler.start = min(done * self.batch_size, len(sampler))
        if len(sampler) < self.batch_size:
            share = f" ({len(sampler)} for each of {sampler.num_replicas} ranks)" if sampler.num_replicas > 1 else ""
            raise ConfigError(
                f"the train split makes {len(self.datasets['train'])} windows of {self.max_length + 1} tokens{share}, "
                f"fewer than data.batch_size={self.batch_size}: lower data.batch_size or model.context_length, "
                "or add data"
            )
        return self._loader(self.datasets["train"], self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["validation"], self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets or len(self.datasets["test"]) == 0:
            raise ConfigError(
                "there is no test split with a full window: set data.test_split > 0 or skip testing (test=false)"
            )
        return self._loader(self.datasets["test"], self.eval_batch_size)

    def eval_dataloader(self, split: str, stride: int | None = None) -> DataLoader:
        """Windows that score every token of ``split`` once (``SlidingWindowDataset``, the text read after an
        end-of-text): non-overlapping, or one every ``stride`` tokens. ``all``: every split's, one after the other
        (a text brought to be scored, scored whole). A task format's packed windows of whole examples, as they are.
        Under DDP each rank scores its share of the windows (``EvalSampler``), none of them twice."""
        split = "validation" if split in ("val", "valid") else split
        if split not in (*self.datasets, "all"):
            raise ConfigError(
                f"split={split!r}: the data has no such split; it has {', '.join(self.datasets)}, or all (every one)"
            )
        if self.format.masked and stride is not None:
            raise ConfigError(
                f"eval.stride={stride}: strided windows are for running text; data.format={self.format.name} "
                "evaluates its packed windows of whole examples: leave eval.stride=null"
            )
        if self.format.masked:
            dataset = self.datasets[split] if split != "all" else self._all_splits()
        else:
            if split == "all":
                tokens = np.concatenate([d.tokens for d in self.datasets.values()])
            else:
                tokens = self.datasets[split].tokens  # memory-mapped, not read in
            eos = self.tokenizer.token_to_id(EOS_TOKEN) if self.tokenizer is not None else None
            dataset = SlidingWindowDataset(tokens, self.max_length, stride, prefix=eos)
        if len(dataset) == 0:
            what = f"{self.format.name} example with anything to score" if self.format.masked else "text"
            where = "the data has" if split == "all" else f"the {split} split has"
            raise ConfigError(f"{where} no {what}: evaluate on other data, or another split")
        padded = BlankPadded(dataset, self.max_length + 1)
        return self._loader(padded, self.eval_batch_size, sampler=EvalSampler(padded))

    def _all_splits(self) -> MaskedWindowDataset:
        """A task format's windows of every split, one after the other (each split's windows hold whole examples)."""
        parts = list(self.datasets.values())
        return MaskedWindowDataset(
            np.concatenate([p.tokens[: len(p) * p.window] for p in parts]),
            np.concatenate([p.mask[: len(p) * p.window] for p in parts]),
            self.max_length + 1,
        )

    def _loader(self, ds: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )
