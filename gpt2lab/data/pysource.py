"""A corpus that scales, offline: every Python source file importable in the running environment.

The standard library and every ``site-packages`` directory the interpreter reads (a virtual environment's
own, the user's, the system's), de-duplicated by content and listed in a fixed order (by root, then path), so
that the same environment gives the same corpus. Nothing ships with gpt2lab and nothing is downloaded: the
corpus is built on the user's machine from what is installed, under each package's own licence. A typical
ML environment holds a few hundred MB of it (torch, transformers, numpy, ...); ``data.max_bytes`` caps it.

The files are streamed into an Arrow dataset on disk (``datasets.Dataset.from_generator``), never held in
memory as a whole; its cache key is a fingerprint of the file listing (paths, sizes, modification times), so
installing or upgrading a package gives a new corpus and an unchanged environment reuses the old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets

from gpt2lab.errors import ConfigError

SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages"}


def source_roots() -> list[tuple[str, Path]]:
    """``(label, directory)`` of the standard library and of each site-packages directory this interpreter
    imports from (a virtual environment's own; the user's when enabled), existing ones only, each once."""
    paths = sysconfig.get_paths()
    sites = [*site.getsitepackages(), paths["purelib"], paths["platlib"]]
    if site.ENABLE_USER_SITE:
        sites.append(site.getusersitepackages())
    roots: list[tuple[str, Path]] = []
    for label, path in [("stdlib", paths["stdlib"])] + [("site-packages", p) for p in sites]:
        resolved = Path(path).resolve()
        if resolved.is_dir() and resolved not in {r for _, r in roots}:
            roots.append((f"{label}{sum(lb.startswith(label) for lb, _ in roots) or ''}", resolved))
    return roots


def list_files(roots: list[tuple[str, Path]]) -> list[tuple[str, str, int, int]]:
    """Every ``.py`` file under the roots as ``(name, path, size, mtime_ns)``, in a fixed order that mixes the
    roots and packages (sorted by a hash of the name), so that ``data.max_bytes`` keeps a sample of all of
    them rather than the standard library alone. A site-packages directory inside another root is read only
    as a root of its own: the base interpreter's, inside its standard library, is not importable from a
    virtual environment."""
    files = []
    for label, root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
            for filename in filenames:
                if filename.endswith(".py"):
                    path = here / filename
                    try:
                        stat = path.stat()
                    except OSError:  # a broken link
                        continue
                    name = f"{label}/{path.relative_to(root).as_posix()}"
                    files.append((name, str(path), stat.st_size, stat.st_mtime_ns))
    return sorted(files, key=lambda f: hashlib.blake2b(f[0].encode(), digest_size=8).digest())


def documents(files: Iterable[tuple[str, str, int, int]], max_bytes: int | None) -> Iterator[dict]:
    """The files' texts, each distinct content once (the first name it has), until ``max_bytes`` of UTF-8 text;
    files that are not UTF-8 are left out."""
    seen: set[bytes] = set()
    total = 0
    for name, path, _, _ in files:
        try:
            raw = Path(path).read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest in seen or not text.strip():
            continue
        seen.add(digest)
        if max_bytes is not None and total + len(raw) > max_bytes:
            return
        total += len(raw)
        yield {"text": text, "name": name, "bytes": len(raw)}


def load_pysource(max_bytes: int | None, cache_dir: str | None) -> tuple[datasets.DatasetDict, str, str]:
    """The corpus as a one-split ``DatasetDict``, its description (documents and size, per root) and fingerprint."""
    if max_bytes is not None and max_bytes < 1:
        raise ConfigError(f"data.max_bytes={max_bytes}: expected a positive number of bytes, or null for all of it")
    roots = source_roots()
    files = list_files(roots)
    listing = hashlib.sha256(json.dumps([files, max_bytes]).encode()).hexdigest()[:16]
    train = datasets.Dataset.from_generator(  # a tuple: datasets would run each item of a list as its own shard
        _generate, gen_kwargs={"files": tuple(files), "max_bytes": max_bytes, "listing": listing}, cache_dir=cache_dir
    )
    size = sum(train["bytes"])
    where = ", ".join(str(path) for _, path in roots)
    description = (
        f"Python source importable here: {len(train):,} distinct files of {len(files):,}, {size / 1e6:.1f} MB"
        + (f" (capped at data.max_bytes={max_bytes:,})" if max_bytes else "")
        + f", from {where}"
    )
    return datasets.DatasetDict({"train": train}), description, listing


def _generate(files: tuple[tuple[str, str, int, int], ...], max_bytes: int | None, listing: str) -> Iterator[dict]:
    """``from_generator``'s generator; ``listing`` is only there to key the dataset's cache."""
    yield from documents(files, max_bytes)
