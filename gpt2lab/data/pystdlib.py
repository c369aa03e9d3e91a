"""The bundled corpus: the running interpreter's own standard library.

No text is shipped with gpt2lab and nothing is downloaded. Every CPython install carries a few MB of
Python source and, in ``pydoc_data``, the English text of the language reference; together they make
a corpus that is real (code and prose), deterministic for a given Python version, and always there.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def pystdlib_documents() -> tuple[list[str], list[str]]:
    """Return ``(names, texts)``: one document per stdlib ``.py`` file and per pydoc topic, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names, texts = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a few files are deliberately in other encodings
            continue
        if text.strip():
            names.append(f"stdlib/{rel.as_posix()}")
            texts.append(text)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for key in sorted(topics):
        names.append(f"pydoc/{key}")
        texts.append(topics[key])
    return names, texts


def describe(texts: list[str]) -> str:
    chars = sum(len(t) for t in texts)
    return f"Python {sys.version.split()[0]} standard library: {len(texts):,} documents, {chars / 1e6:.1f}M characters"


def corpus_fingerprint(names: list[str], texts: list[str]) -> str:
    h = hashlib.sha256()
    for name, text in zip(names, texts, strict=True):
        h.update(name.encode())
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:16]
