"""The config tree: where it is (a source checkout's ``conf/`` or the installed ``gpt2lab.conf``), its groups,
and composing ``conf/train.yaml`` from Python as ``python train.py`` composes it from the command line.

``compose_train`` is the one way gpt2lab composes the training config outside a Hydra command (the Python API,
the presets, the wizard, the benchmarks): the same tree, schemas, ``group=null`` reading and error text.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from gpt2lab.config.schemas import register_schemas
from gpt2lab.errors import ConfigError


def config_path() -> str:
    """Where the config tree is: ``conf/`` of a source checkout, else the copy installed as ``gpt2lab.conf``."""
    source_tree = Path(__file__).resolve().parents[2] / "conf"  # <checkout>/conf beside <checkout>/gpt2lab/config/
    return str(source_tree) if (source_tree / "train.yaml").is_file() else "pkg://gpt2lab.conf"


def config_root() -> Path:
    """The config tree as a directory, to read its files: ``conf/`` of a source checkout, else the installed
    ``gpt2lab.conf``."""
    path = config_path()
    return Path(str(importlib.resources.files("gpt2lab.conf"))) if path.startswith("pkg://") else Path(path)


def config_groups() -> set[str]:
    """The names of the config groups (``model``, ``scheduler``, ...): the directories of the config tree."""
    path = config_path()
    root = importlib.resources.files("gpt2lab.conf") if path.startswith("pkg://") else Path(path)
    return {entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("_")}


def group_options(group: str) -> list[str]:
    """The options of a config group (``conf/preset/*.yaml``: ``small``, ``tiny``, ...), sorted, read now (a preset
    added since start-up is listed)."""
    path = config_path()
    root = importlib.resources.files("gpt2lab.conf") if path.startswith("pkg://") else Path(path)
    directory = root / group
    if not directory.is_dir():
        return []
    return sorted(entry.name[: -len(".yaml")] for entry in directory.iterdir() if entry.name.endswith(".yaml"))


def null_group_overrides(args: list[str]) -> list[str]:
    """``group=null`` read as ``~group`` (drop the group's default): Hydra only knows the latter, and stops
    with a traceback on the former, which is what users of Hydra-based tools type."""
    groups = config_groups()
    return [f"~{a.partition('=')[0]}" if a.endswith("=null") and a.partition("=")[0] in groups else a for a in args]


def hydra_string(text: str) -> str:
    """``text`` as a quoted string of Hydra's override grammar, read back as exactly ``text``. Hydra reads a
    backslash as itself except before a quote or the closing quote: only those are doubled."""
    return "'" + re.sub(r"(\\+)(?='|$)", r"\1\1", text).replace("'", "\\'") + "'"


def literal_overrides(args: list[str], keys: tuple[str, ...]) -> list[str]:
    """``key=<any text>`` taken as that text: quoted for Hydra's override grammar, which would otherwise parse
    ``prompt="def f(n):"`` (the shell has removed the quotes) as an expression and fail on the parentheses."""
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in keys and not (len(value) > 1 and value[0] == value[-1] and value[0] in "'\""):
            arg = f"{key}={hydra_string(value)}"
        quoted.append(arg)
    return quoted


def given_on_command_line(*keys: str) -> bool:
    """Whether the command line sets any of ``keys`` (a group, ``tokenizer``, or a value, ``inference.stop``),
    itself or below it (``tokenizer.name=...``), rather than leaving it to the config files."""
    from hydra.core.hydra_config import HydraConfig

    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    names = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    return any(name == key or name.startswith(f"{key}.") for name in names for key in keys)


@contextlib.contextmanager
def config_tree(job_name: str = "train") -> Iterator[None]:
    """Hydra initialized on gpt2lab's config tree, with the job name the command line has (``train``: its log is
    ``train.log``). Hydra's global state is cleared before and after."""
    register_schemas()
    GlobalHydra.instance().clear()
    path = config_path()
    if path.startswith("pkg://"):
        context = initialize_config_module(path.removeprefix("pkg://"), job_name=job_name)
    else:
        context = initialize_config_dir(path, job_name=job_name)
    try:
        with context:
            yield
    finally:
        GlobalHydra.instance().clear()


def compose_train(overrides: Sequence[str] = (), hydra_node: bool = False) -> DictConfig:
    """``conf/train.yaml`` with ``overrides`` (command-line strings), as ``python train.py`` composes it:
    ``group=null`` drops the group, and a key or value the command line refuses raises a ``ConfigError`` with
    the message it prints (Hydra's error and OmegaConf's cause, with its "Did you mean"). ``hydra_node`` keeps
    ``cfg.hydra``, which running the config as the command line does needs. Works inside ``config_tree()``
    too (the wizard composes many times in one)."""
    try:
        if GlobalHydra.instance().is_initialized():
            return _compose(overrides, hydra_node)
        with config_tree():
            return _compose(overrides, hydra_node)
    except (HydraException, OmegaConfBaseException) as e:
        cause = f"\n{e.__cause__}" if isinstance(e.__cause__, OmegaConfBaseException) else ""
        raise ConfigError(f"{e}{cause}") from None


def _compose(overrides: Sequence[str], hydra_node: bool) -> DictConfig:
    return compose("train", overrides=null_group_overrides(list(overrides)), return_hydra_config=hydra_node)
