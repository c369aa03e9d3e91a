"""``conf/experiment/<name>.yaml``: the one writer of experiment files, for ``presets cp``, the wizard and the
sweep's ``export-best``, with one rule: an existing file is never replaced unless the caller asks to, and the
refusal names the file."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from gpt2lab.config.tree import config_path
from gpt2lab.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def default_config_dir() -> Path:
    """Where new experiments go: ``conf/`` of a source checkout; for an installed gpt2lab, ``./conf`` (the
    installed config tree is not the user's to edit), used with ``python train.py --config-dir conf``."""
    path = config_path()
    return Path("conf") if path.startswith("pkg://") else Path(path)


def searchpath_flag(config_dir: Path) -> str:
    """`` --config-dir <dir>`` when ``train.py`` would not find experiments in ``config_dir`` by itself."""
    path = config_path()
    own = not path.startswith("pkg://") and Path(config_dir).resolve() == Path(path).resolve()
    return "" if own else f" --config-dir {config_dir}"


def check_experiment_name(name: str | None) -> str:
    """``name`` if it makes a file name Hydra can select (``experiment=<name>``); else a ConfigError."""
    if not name:
        raise ConfigError("an experiment name is needed (e.g. my_recipe)")
    if not NAME.fullmatch(name):
        raise ConfigError(f"name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")
    return name


def experiment_path(name: str, config_dir: Path | str | None = None) -> Path:
    return Path(config_dir if config_dir is not None else default_config_dir()) / "experiment" / f"{name}.yaml"


def write_experiment(
    name: str, text: str, config_dir: Path | str | None = None, overwrite: bool = False, to_replace: str = ""
) -> Path:
    """Write ``text`` as ``<config_dir>/experiment/<name>.yaml`` and return its path. An existing file is a
    ConfigError naming it, unless ``overwrite``; ``to_replace`` tells how to ask (``pass --force``). The file
    appears whole or not at all."""
    path = experiment_path(check_experiment_name(name), config_dir)
    how = f", or {to_replace} to replace it" if to_replace else ""
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists: choose another name{how}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(prefix=f".{name}.", suffix=".yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if overwrite:
            os.replace(staged, path)
        else:
            os.link(staged, path)  # fails if the file appeared since the check: never replaced unasked
    except FileExistsError:
        raise ConfigError(f"{path} exists: choose another name{how}") from None
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return path
