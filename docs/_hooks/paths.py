"""MkDocs hook: the manual and the README name only code that exists.

Code moves (a module into a package, a package renamed); prose that names the old place then sends readers to
nothing. Each page, and README.md, is searched for repository paths under ``gpt2lab/`` and for ``python -m
gpt2lab.<module>`` commands; one that names nothing in the checkout is a warning, which ``mkdocs build --strict``
(``nox -s docs``) turns into a failure.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.paths")

# A path under gpt2lab/ (placeholders such as gpt2lab/<verb>/ are left alone), and a `python -m` module.
PATH = re.compile(r"(?<![\w/.~-])gpt2lab/[\w./-]*")
MODULE = re.compile(r"python -m (gpt2lab(?:\.\w+)+)")


def missing(text: str, root: Path) -> list[str]:
    """The paths and ``python -m`` modules that ``text`` names and ``root`` (the checkout) does not hold."""
    gone = []
    for match in PATH.finditer(text):
        path = match.group(0).rstrip(".")
        if text[match.end() : match.end() + 1] != "<" and not (root / path).exists():
            gone.append(path)
    for match in MODULE.finditer(text):
        module = root / match.group(1).replace(".", "/")
        if not (module.with_suffix(".py").exists() or (module / "__main__.py").exists()):
            gone.append(f"python -m {match.group(1)}")
    return sorted(set(gone))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    root = Path(config.config_file_path).parent
    for name in missing(markdown, root):
        log.warning(
            f"{page.file.src_path} names {name}, which is not in the checkout: point it at the code's new place"
        )
    return markdown


def on_post_build(config: Any) -> None:
    root = Path(config.config_file_path).parent
    for name in missing((root / "README.md").read_text(encoding="utf-8"), root):
        log.warning(f"README.md names {name}, which is not in the checkout: point it at the code's new place")
