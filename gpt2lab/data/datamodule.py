"""Token files on disk, fixed-length windows over them, and the LightningDataModule that serves them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sized
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from filelock import FileLock, Timeout
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gpt2lab.data import formats
from gpt2lab.data.corpus import Corpus, load_corpus
from gpt2lab.data.formats import OVERLONG, MaskedWindowDataset, TaskFormat
from gpt2lab.errors import ConfigError
from gpt2lab.tokenizers import EOS_TOKEN, PAD_TOKEN, TokenizerSpec, fingerprint, validate_tokenizer
from gpt2lab.tokenizers.build import unknown_token_id

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
MAX_UNKNOWN = 0.01  # fraction of the validation tokens that may be unknown before a run warns


class TokenBlockDataset(Dataset):
    """Non-overlapping windows of ``block_size + 1`` tokens (inputs plus the shifted targets)."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return max(len(self.tokens) - 1, 0) // self.block_size

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.block_size
        return torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))


class SlidingWindowDataset(Dataset):
    """Windows of ``block_size + 1`` tokens every ``stride`` tokens, for evaluation: each token is predicted
    with up to a full context. Item ``i`` is ``(window, first_scored)``: the window's labels before
    ``first_scored`` were scored by the window before it and serve as context only. With ``stride ==
    block_size`` these are ``TokenBlockDataset``'s windows, every label scored."""

    def __init__(self, tokens: np.ndarray, block_size: int, stride: int) -> None:
        if not 1 <= stride <= block_size:
            raise ConfigError(f"eval.stride={stride}: expected 1 to the context length ({block_size}), or null")
        self.tokens = tokens
        self.block_size = block_size
        self.stride = stride

    def __len__(self) -> int:
        n = len(self.tokens) - 1 - self.block_size  # where the last full window may start
        return n // self.stride + 1 if n >= 0 else 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        start = i * self.stride
        window = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return window, 0 if i == 0 else self.block_size - self.stride


class ResumableRandomSampler(DistributedSampler):
    """This rank's share of a seeded permutation per epoch, able to start part-way through, so that a
    resumed run sees the same batches, in the same order, as an uninterrupted one.

    Each epoch is ``torch.randperm`` seeded by ``seed + epoch`` (Lightning calls ``set_epoch``), less
    the tail that does not split evenly, and rank ``r`` takes every ``num_replicas``-th index from
    ``r``: ``DistributedSampler(shuffle=True, drop_last=True)``. With one replica that is the whole
    permutation. It is a ``DistributedSampler`` so that Lightning uses it as is under DDP; any other
    sampler gets wrapped in ``DistributedSamplerWrapper``, which splits the sampler's own order across
    ranks and so cannot start mid-epoch. ``len()`` stays the full epoch, so that Lightning's count of
    the epoch's batches is the same in a resumed run as in the run it resumes."""

    def __init__(self, dataset: Sized, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0  # samples of this rank's current epoch already consumed (set on resume)

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())[self.start :]
        self.start = 0
        return iter(order)


def damaged_token_files(token_dir: Path) -> str | None:
    """What is wrong with cached token files (``"missing"`` when there are none), or None when they are whole:
    each file has the size ``meta.json`` recorded and, where it recorded one, the same content hash. A file
    cut short (a full disk, a killed copy) or altered would otherwise be trained on as it is."""
    try:
        meta = json.loads((token_dir / "meta.json").read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"meta.json unreadable: {e}"
    itemsize = np.dtype(meta["dtype"]).itemsize
    expected = meta.get("files") or {  # caches written before hashes were recorded: sizes only
        f"{split}.bin": {"bytes": s["tokens"] * itemsize} for split, s in meta["splits"].items()
    }
    for name, want in expected.items():
        path = token_dir / name
        size = path.stat().st_size if path.is_file() else None
        if size != want["bytes"]:
            return f"{name} has {'no file' if size is None else f'{size:,} bytes'}, {want['bytes']:,} expected"
        if "blake2b" in want and _file_hash(path) != want["blake2b"]:
            return f"{name} does not have the content recorded in meta.json"
    return None


def _file_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _publish(tmp: Path, out: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` into the finished ``tmp`` directory and rename it to ``out``: atomic, so a half-written
    cache is never picked up. When another process finished first, its files are identical: ``tmp`` goes."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, out)
    except OSError:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


class GPT2DataModule(pl.LightningDataModule):
    """Corpus -> tokenizer -> token files (cached, memory-mapped) -> window datasets -> dataloaders."""

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
        cache_dir: str = "~/.cache/gpt2lab",
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
            columns=self.format.source_columns() if self.format.masked else None,
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
        self.cache_dir = Path(cache_dir).expanduser()
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
        train_texts = corpus.splits["train"]
        tokenizer = self.tokenizer_spec.build(
            texts=lambda: formats.training_texts(train_texts, self.format),
            corpus_fingerprint=corpus.fingerprint,
            cache_dir=self.cache_dir,
            n_texts=len(train_texts),
        )
        validate_tokenizer(tokenizer, next(formats.training_texts(train_texts, self.format))[:2000])
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
            problem = damaged_token_files(self._token_dir)
            if problem is None:
                log.info("Loaded cached token files from %s", self._token_dir)
            else:
                if (self._token_dir / "meta.json").exists():
                    log.warning(
                        "The cached token files in %s are damaged (%s): writing them again", self._token_dir, problem
                    )
                    shutil.rmtree(self._token_dir)
                if self.format.masked:
                    self._write_example_files(corpus, tokenizer, self._token_dir)
                else:
                    self._write_token_files(corpus, tokenizer, self._token_dir)
        finally:
            lock.release()
        self.stats = json.loads((self._token_dir / "meta.json").read_text())["splits"]
        self.tokenizer = tokenizer
        self._log_stats()
        self._warn_unknown()

    def _write_token_files(self, corpus: Corpus, tokenizer: Tokenizer, out: Path) -> None:
        eos = tokenizer.token_to_id(EOS_TOKEN)
        unk = unknown_token_id(tokenizer)
        dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.uint32
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        stats, files = {}, {}
        for split, ds in corpus.splits.items():
            log.info("Tokenizing the %s split (%d documents)", split, len(ds))
            encoded = ds.map(
                lambda b: {
                    "ids": [e.ids + [eos] for e in tokenizer.encode_batch(b["text"])],
                    "chars": [len(t) for t in b["text"]],
                },
                batched=True,
                batch_size=256,
                num_proc=self.preprocessing_num_workers,
                remove_columns=["text"],
                desc=f"Tokenizing {split}",
            )
            n_tokens = n_unknown = 0
            digest = hashlib.blake2b(digest_size=16)
            with open(tmp / f"{split}.bin", "wb") as f:
                for batch in encoded.iter(batch_size=1024):
                    arr = np.concatenate([np.asarray(ids, dtype=dtype) for ids in batch["ids"]])
                    f.write(arr.tobytes())
                    digest.update(arr.tobytes())
                    n_tokens += len(arr)
                    n_unknown += 0 if unk is None else int(np.count_nonzero(arr == unk))
            files[f"{split}.bin"] = {"bytes": n_tokens * np.dtype(dtype).itemsize, "blake2b": digest.hexdigest()}
            stats[split] = {
                "documents": len(ds),
                "characters": int(sum(encoded["chars"])),
                "tokens": n_tokens,
                "unknown": n_unknown,
            }
        meta = {"dtype": np.dtype(dtype).name, "tokenizer": fingerprint(tokenizer), "splits": stats, "files": files}
        _publish(tmp, out, meta)

    def _write_example_files(self, corpus: Corpus, tokenizer: Tokenizer, out: Path) -> None:
        """A task format's token files: per split, the packed windows (``<split>.bin``) and which of their tokens
        the loss covers (``<split>.mask.bin``, one byte per token), both recorded in meta.json for
        ``damaged_token_files``."""
        window = self.max_length + 1
        pad = tokenizer.token_to_id(PAD_TOKEN)
        pad = tokenizer.token_to_id(EOS_TOKEN) if pad is None else pad  # never scored, so any token does
        unk = unknown_token_id(tokenizer)
        dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.uint32
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        stats, files = {}, {}
        for split, ds in corpus.splits.items():
            log.info("Tokenizing the %s split (%d %s records)", split, len(ds), self.format.name)
            encoded = ds.map(
                formats.encode_examples,
                fn_kwargs=dict(fmt=self.format, tokenizer=tokenizer, window=window, overlong=self.overlong),
                batched=True,
                batch_size=256,
                num_proc=self.preprocessing_num_workers,
                remove_columns=ds.column_names,
                desc=f"Tokenizing {split}",
            )
            status = np.asarray(encoded["status"])
            lengths = np.asarray(encoded["length"], dtype=np.int64)
            kept = np.flatnonzero(lengths > 0)
            window_of, offset_of, n_windows = formats.pack(lengths[kept], window, self.packing)
            start = np.full(len(lengths), -1, dtype=np.int64)
            start[kept] = window_of * window + offset_of
            # Written in place on disk (a split may be larger than memory), then hashed as it was written.
            size = max(n_windows * window, 1)  # np.memmap cannot map an empty file
            tokens = np.memmap(tmp / f"{split}.bin", dtype=dtype, mode="w+", shape=(size,))
            mask = np.memmap(tmp / f"{split}.mask.bin", dtype=np.uint8, mode="w+", shape=(size,))
            tokens[:], mask[:] = pad, 0
            row = 0
            for batch in encoded.select_columns(["ids", "mask"]).iter(batch_size=1024):
                for ids, scored in zip(batch["ids"], batch["mask"], strict=True):
                    if start[row] >= 0:
                        tokens[start[row] : start[row] + len(ids)] = ids
                        mask[start[row] : start[row] + len(ids)] = scored
                    row += 1
            n_scored = int(mask.sum(dtype=np.int64))
            n_unknown = 0 if unk is None else int(np.count_nonzero((tokens == unk) & mask.astype(bool)))
            tokens.flush()
            mask.flush()
            del tokens, mask
            for name, itemsize in ((f"{split}.bin", np.dtype(dtype).itemsize), (f"{split}.mask.bin", 1)):
                path = tmp / name
                if n_windows == 0:
                    path.write_bytes(b"")
                files[name] = {"bytes": n_windows * window * itemsize, "blake2b": _file_hash(path)}
            counts = {s: int(np.count_nonzero(status == i)) for i, s in enumerate(formats.EXAMPLE_STATUS)}
            stats[split] = {
                "documents": len(ds),
                "characters": int(sum(encoded["chars"])),
                "tokens": n_windows * window,  # the windows' tokens, padding included
                "unknown": n_unknown,
                "windows": n_windows,
                "examples": len(kept),
                "real_tokens": int(lengths.sum()),
                "scored_tokens": n_scored,
                "truncated": counts["truncated"],
                "dropped_too_long": counts["too long"],
                "dropped_nothing_to_score": counts["nothing to score"],
            }
        meta = {
            "dtype": np.dtype(dtype).name,
            "tokenizer": fingerprint(tokenizer),
            "format": self.format.settings() | {"window": window, "packing": self.packing, "overlong": self.overlong},
            "splits": stats,
            "files": files,
        }
        _publish(tmp, out, meta)

    def _warn_unknown(self) -> None:
        """Warn when the tokenizer maps more than MAX_UNKNOWN of the validation text to its unknown token."""
        assert self.tokenizer is not None and self._token_dir is not None
        unk = unknown_token_id(self.tokenizer)
        validation = self.stats["validation"]
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
        """The windows of ``split`` for evaluation: non-overlapping, or one every ``stride`` tokens. ``all``: every
        split's, one after the other (a text brought to be scored, scored whole)."""
        split = "validation" if split in ("val", "valid") else split
        if split not in (*self.datasets, "all"):
            raise ConfigError(
                f"split={split!r}: the data has no such split; it has {', '.join(self.datasets)}, or all (every one)"
            )
        blocks = self.datasets[split] if split != "all" else self._all_splits()
        if self.format.masked and stride is not None:
            raise ConfigError(
                f"eval.stride={stride}: strided windows are for running text; data.format={self.format.name} "
                "evaluates its packed windows of whole examples: leave eval.stride=null"
            )
        dataset = blocks if stride is None else SlidingWindowDataset(blocks.tokens, self.max_length, stride)
        if len(dataset) == 0:
            raise ConfigError(
                f"the {split} split has {len(blocks.tokens)} tokens, too few for one window of {self.max_length + 1} "
                "(the model's context + 1): evaluate on more text"
            )
        return self._loader(dataset, self.eval_batch_size)

    def _all_splits(self) -> TokenBlockDataset | MaskedWindowDataset:
        parts = list(self.datasets.values())
        if not self.format.masked:
            return TokenBlockDataset(np.concatenate([p.tokens for p in parts]), self.max_length)
        return MaskedWindowDataset(  # each split's windows of whole examples, one after the other
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
