"""Load a text corpus as ``datasets`` splits: the bundled stdlib corpus, local files, or the Hub."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from gpt2lab import hub
from gpt2lab.data import pysource, pystdlib, stream
from gpt2lab.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("pystdlib", "pysource", "files", "hub")
OFFLINE_SOURCES = ("pystdlib", "pysource")  # built on this machine, never downloaded
FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
VALIDATION_NAMES = ("validation", "valid", "val", "dev")
SOURCE_KEYS = {
    "path": "files",
    "name": "hub",
    "config_name": "hub",
    "max_bytes": "pysource",
}  # data.<key> -> its source


@dataclass
class Corpus:
    """Train/validation/test splits, each a ``datasets.Dataset`` with a ``text`` column, or (``columns``) the
    record columns of a task format and ``record``, each record's number in its file or Hub split.

    Streamed (``data.streaming``), each split is a ``datasets.IterableDataset`` read once, in order, and
    ``carve`` holds the validation and test fractions (and seed) that ``route`` takes out of train's documents as
    they stream by; the dataset's own validation and test splits, where it has them, stream as they are."""

    splits: dict[str, datasets.Dataset | datasets.IterableDataset]
    fingerprint: str
    description: str
    carve: tuple[float, float, int] = (0.0, 0.0, 0)

    @property
    def streamed(self) -> bool:
        return isinstance(self.splits["train"], datasets.IterableDataset)

    def split_names(self) -> list[str]:
        """The splits that get token files: the corpus' own, and those ``carve`` takes out of train."""
        fractions = dict(zip(("validation", "test"), self.carve[:2], strict=True))
        return ["train", *(name for name, fraction in fractions.items() if name in self.splits or fraction > 0)]


def load_corpus(
    source: str,
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
    num_proc: int | None = None,
    hf_cache_dir: str | None = None,
    max_bytes: int | None = None,
    offline_fallback: str | None = None,
    columns: dict[str, list[str]] | None = None,
    hold_out: bool = True,
    streaming: bool = False,
) -> Corpus:
    """Load, clean and split a corpus; the dataset's own validation/test splits win over the fractions.
    ``hold_out=False`` (a text to be scored whole) carves nothing out: every document stays in the train split,
    in its order, and ``val_split`` and ``test_split`` are not read.
    ``offline_fallback`` (pystdlib or pysource) replaces a Hub dataset that is neither reachable nor cached.
    ``columns`` (data.<key> -> column names) keeps records of a task format (gpt2lab/data/formats.py) instead
    of a column of text. ``streaming`` (data=hub and data=files) reads the documents once, in order, as they are
    tokenized, with no copy on disk (``Corpus``)."""
    if source not in SOURCES:
        raise ConfigError(f"data.source={source!r}: expected one of {', '.join(SOURCES)}")
    if streaming:
        stream.check(source, columns, remove_duplicates)
    if offline_fallback not in (None, *OFFLINE_SOURCES):
        raise ConfigError(
            f"data.offline_fallback={offline_fallback!r}: expected {' or '.join(OFFLINE_SOURCES)} (or null: no fallback)"
        )
    for key, value in (("path", path), ("name", name), ("config_name", config_name), ("max_bytes", max_bytes)):
        if value is not None and SOURCE_KEYS[key] not in (source, offline_fallback):
            # a task format (columns) keeps its data= option and switches source; data=files would read plain text
            fix = f"data.source={SOURCE_KEYS[key]}" if columns else f"data={SOURCE_KEYS[key]}"
            raise ConfigError(
                f"data.{key}={value!r} is read by data={SOURCE_KEYS[key]} only, and data.source is {source!r}: "
                f"add {fix}"
            )
    for key, value in (("val_split", val_split), ("test_split", test_split)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{key}={value}: expected a fraction in [0, 1)")
    if not hold_out:
        val_split = test_split = 0.0
    elif val_split <= 0 and source != "hub":
        raise ConfigError("data.val_split must be > 0: validation loss is what checkpoints are ranked by")

    if source == "pystdlib":
        names, texts = pystdlib.pystdlib_documents()
        raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts, "name": names})})
        description = pystdlib.describe(texts)
        base_fingerprint = pystdlib.corpus_fingerprint(names, texts)
    elif source == "pysource":
        raw, description, base_fingerprint = pysource.load_pysource(max_bytes, hf_cache_dir)
    elif source == "files":
        raw, description, files = _load_files(
            path, None if columns else text_column, sample_by, hf_cache_dir, num_proc, streaming
        )
        base_fingerprint = stream.fingerprint(files=files) if streaming else _fingerprint_splits(raw)
    else:
        try:
            raw, description = _load_hub(name, config_name, hf_cache_dir, streaming)
            base_fingerprint = stream.fingerprint(hub=[name, config_name]) if streaming else _fingerprint_splits(raw)
        except ConfigError:
            why_offline = hub.go_offline_if_unreachable()
            if not (offline_fallback and why_offline) or columns:  # no offline corpus of records
                raise
            log.warning(
                "data.name=%r is not in the local cache and %s: training on data=%s instead (data.offline_fallback)",
                name, why_offline, offline_fallback,
            )  # fmt: skip
            return load_corpus(
                offline_fallback, None, None, None, "text", sample_by, val_split or 0.05, test_split or 0.05,
                split_seed, min_length, remove_duplicates, num_proc, hf_cache_dir, max_bytes, hold_out=hold_out,
            )  # fmt: skip

    if columns:
        return _record_corpus(raw, columns, description, base_fingerprint, val_split, test_split, split_seed)
    if streaming:
        splits, carve = stream.text_splits(
            raw, text_column, min_length, val_split, test_split, split_seed, VALIDATION_NAMES
        )
        settings = [base_fingerprint, *carve, min_length, text_column, "streamed"]
        fingerprint = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
        return Corpus(splits=splits, fingerprint=fingerprint, description=description, carve=carve)
    if text_column not in raw["train"].column_names:
        raise ConfigError(
            f"data.text_column={text_column!r} is not a column of the data; its columns are {raw['train'].column_names}"
        )
    raw = _as_text(raw, text_column).select_columns([text_column])
    if text_column != "text":
        raw = raw.rename_column(text_column, "text")
    if min_length > 0:
        raw = raw.filter(
            lambda b: [len((t or "").strip()) >= min_length for t in b["text"]], batched=True, num_proc=num_proc
        )
    else:
        raw = raw.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True, num_proc=num_proc)
    if remove_duplicates:
        raw = datasets.DatasetDict({k: _drop_duplicates(v) for k, v in raw.items()})

    splits = _split(raw, val_split, test_split, split_seed)
    if len(splits["train"]) == 0:
        raise ConfigError(f"the corpus is empty after filtering ({description}); check data.path and data.min_length")
    settings = [base_fingerprint, val_split, test_split, split_seed, min_length, remove_duplicates, text_column]
    fingerprint = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    return Corpus(splits=splits, fingerprint=fingerprint, description=description)


def _record_corpus(
    raw: datasets.DatasetDict,
    columns: dict[str, list[str]],
    description: str,
    base_fingerprint: str,
    val_split: float,
    test_split: float,
    split_seed: int,
) -> Corpus:
    """Records of a task format: the columns it reads, each record numbered (for error messages), split."""
    have = raw["train"].column_names
    for key, names in columns.items():
        for name in names:
            if name not in have:
                raise ConfigError(
                    f"data.{key}={name!r} is not a column of {description}; its columns are {have}: "
                    f"set data.{key} to the column that holds it"
                )
    keep = list(dict.fromkeys(n for names in columns.values() for n in names))
    raw = datasets.DatasetDict(
        {k: v.select_columns(keep).add_column("_record", list(range(len(v)))) for k, v in raw.items()}
    )
    splits = _split(raw, val_split, test_split, split_seed)
    if len(splits["train"]) == 0:
        raise ConfigError(f"the data has no records ({description}); check data.path")
    settings = [base_fingerprint, val_split, test_split, split_seed, columns]
    fingerprint = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    return Corpus(splits=splits, fingerprint=fingerprint, description=description)


def _as_text(raw: datasets.DatasetDict, column: str) -> datasets.DatasetDict:
    """The text column as strings: numbers and other scalars are converted (with a warning), lists and records refused."""
    features = raw["train"].features
    feature = features[column]
    if _is_text(feature):
        return raw
    if not isinstance(feature, datasets.Value):
        kind = {dict: "records", datasets.List: "lists"}.get(type(feature), f"{type(feature).__name__} values")
        raise ConfigError(
            f"data.text_column={column!r} holds {kind} ({feature}), not text: set data.text_column to a column "
            f"of text; the columns of text are {[name for name, f in features.items() if _is_text(f)]}"
        )
    log.warning("data.text_column=%r holds %s values, not text: converting them to text", column, feature.dtype)
    return raw.cast_column(column, datasets.Value("string"))


def _is_text(feature: datasets.features.features.FeatureType) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _load_files(
    path: str | None,
    text_column: str | None,
    sample_by: str,
    cache_dir: str | None,
    num_proc: int | None = None,
    streaming: bool = False,
) -> tuple[datasets.DatasetDict | datasets.IterableDatasetDict, str, list[str]]:
    """``path``'s files as a dataset, its description and the files; ``text_column`` None: records of a task format,
    which text files are not. ``num_proc`` processes read them into ``datasets``' Arrow cache, a file each at a
    time; ``streaming`` reads them as they are used, with no cache."""
    if not path:
        raise ConfigError("data=files needs data.path=<file, directory or glob of .txt/.jsonl/.json/.csv/.parquet>")
    expanded = os.path.expanduser(str(path))
    if os.path.isdir(expanded):
        files = sorted(
            f for f in glob.glob(os.path.join(expanded, "**", "*"), recursive=True) if Path(f).suffix in FILE_BUILDERS
        )
        if not files:
            raise ConfigError(f"data.path={path!r}: the directory holds no {', '.join(FILE_BUILDERS)} files")
    else:
        files = sorted(glob.glob(expanded))
    if not files:
        raise ConfigError(f"data.path={path!r}: no such file (looked for {os.path.abspath(expanded)})")
    if all(os.path.getsize(f) == 0 for f in files):
        raise ConfigError(
            f"data.path={path!r}: the file is empty"
            if len(files) == 1
            else f"data.path={path!r}: all {len(files)} files are empty"
        )
    unreadable = [f for f in files if Path(f).suffix.lower() not in FILE_BUILDERS]
    if unreadable:
        named = "; ".join(
            f"{f} has the extension {Path(f).suffix}, which data=files does not read"
            if Path(f).suffix
            else f"{f} has no extension"
            for f in unreadable[:3]
        )
        more = f" (and {len(unreadable) - 3} more files)" if len(unreadable) > 3 else ""
        raise ConfigError(f"data.path={path!r}: {named}{more}; data=files reads {', '.join(FILE_BUILDERS)}")
    kinds: dict[str, list[str]] = {}
    for f in files:
        kinds.setdefault(FILE_BUILDERS[Path(f).suffix.lower()], []).append(f)
    if len(kinds) > 1:
        mix = "; ".join(f"{kind}: {paths[0]}" for kind, paths in sorted(kinds.items()))
        raise ConfigError(
            f"data.path={path!r}: the files mix kinds ({mix}): data=files reads one kind at a time, "
            "so point data.path at files of one kind"
        )
    builder = next(iter(kinds))
    if text_column is None and builder == "text":
        raise ConfigError(
            f"data.path={path!r}: a task format (data.format) reads records, from .jsonl, .json, .csv or .parquet "
            "files, not text files; see docs/presets.md, Tasks, for the record of each format"
        )
    kwargs = {"sample_by": sample_by} if builder == "text" else {}
    if builder == "text" and sample_by not in ("line", "paragraph", "document"):
        raise ConfigError(f"data.sample_by={sample_by!r}: expected line, paragraph or document")
    try:
        if streaming:
            kwargs["streaming"] = True
        elif num_proc and num_proc > 1 and len(files) > 1:
            kwargs["num_proc"] = min(num_proc, len(files))
        raw = datasets.load_dataset(builder, data_files={"train": files}, cache_dir=cache_dir, **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types
        # DatasetGenerationError says only that it failed; its cause is the parser's own message (what, which row)
        detail = e.__cause__ if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__ else e
        raise ConfigError(f"data.path={path!r}: could not read it as {builder}: {detail}") from e
    if (
        builder != "text"
        and text_column is not None
        and text_column not in (raw["train"].column_names or [text_column])
    ):
        raise ConfigError(
            f"data.text_column={text_column!r} is not a column of {path}; its columns are {raw['train'].column_names}"
        )
    size = sum(os.path.getsize(f) for f in files)
    return raw, f"{len(files)} {builder} file(s) at {path} ({size / 1e6:.1f} MB)", files


def _load_hub(
    name: str | None, config_name: str | None, cache_dir: str | None, streaming: bool = False
) -> tuple[datasets.DatasetDict | datasets.IterableDatasetDict, str]:
    if not name:
        raise ConfigError(
            "data=hub needs data.name=<Hugging Face dataset name> (and data.config_name if it has configs)"
        )
    label = f"{name} ({config_name})" if config_name else name
    offline = hub.go_offline_if_unreachable()
    try:
        raw = datasets.load_dataset(name, config_name, cache_dir=cache_dir, streaming=streaming)
    except Exception as e:
        failed = f"data.name={name!r}: could not load {label} from the Hugging Face Hub"
        if offline:
            raise ConfigError(
                f"{failed}; {offline} ({type(e).__name__}: {e}). "
                "Offline, use data=pystdlib (bundled) or data=files data.path=<your text files>."
            ) from e
        raise ConfigError(f"{failed} ({type(e).__name__}: {e}): check data.name and data.config_name") from e
    if not isinstance(raw, datasets.DatasetDict | datasets.IterableDatasetDict) or "train" not in raw:
        raise ConfigError(f"data.name={name!r}: the dataset has no 'train' split")
    return raw, f"Hugging Face dataset {label}"


def _split(raw: datasets.DatasetDict, val_split: float, test_split: float, seed: int) -> dict[str, datasets.Dataset]:
    """Use the dataset's own splits where present, else carve deterministic fractions out of train."""
    train = raw["train"]
    val = next((raw[k] for k in VALIDATION_NAMES if k in raw), None)
    test = raw.get("test")
    carve = (0.0 if val is not None else val_split) + (0.0 if test is not None else test_split)
    if carve > 0:
        if len(train) < 3:
            raise ConfigError(
                f"the corpus has {len(train)} document(s) after cleaning, too few to split off validation/test "
                "documents: add text (text files make one document per blank-line-separated paragraph, or per "
                "line with data.sample_by=line)"
            )
        parts = train.train_test_split(test_size=carve, seed=seed, shuffle=True)
        train, held_out = parts["train"], parts["test"]
        if val is None and test is None:
            if test_split > 0 and len(held_out) < 2:
                raise ConfigError(
                    f"the corpus has {len(train) + len(held_out)} documents, and data.val_split + data.test_split "
                    f"holds out {len(held_out)}, too few for a validation and a test document: add text, raise "
                    "data.val_split and data.test_split, or data.test_split=0 (no test split)"
                )
            if test_split > 0:
                halves = held_out.train_test_split(test_size=test_split / carve, seed=seed, shuffle=True)
                val, test = halves["train"], halves["test"]
            else:
                val = held_out
        elif val is None:
            val = held_out
        else:
            test = held_out
    splits = {"train": train}
    if val is not None:  # none where nothing is held out (load_corpus's hold_out=False)
        splits["validation"] = val
    if test is not None:
        splits["test"] = test
    return splits


def _drop_duplicates(ds: datasets.Dataset) -> datasets.Dataset:
    seen: set[bytes] = set()
    keep = []
    for i, text in enumerate(ds["text"]):
        h = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return ds.select(keep)


def _fingerprint_splits(raw: datasets.DatasetDict) -> str:
    return hashlib.sha256("".join(f"{k}:{v._fingerprint}" for k, v in sorted(raw.items())).encode()).hexdigest()[:16]
