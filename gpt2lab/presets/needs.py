"""What a recommended run needs from the Hugging Face Hub that this machine does not have: a recommendation
(``gpt2lab presets --recommend``) must run where it is made, or say what it needs first.

A run downloads at its start the pretrained weights ``model.init_from`` (or ``model=hf``'s
``model.name_or_path``) names and the Hub dataset ``data.name`` names, unless they are local directories or in the
local cache. When the Hub is unreachable (``gpt2lab.hub``) and one of them is not cached, the run fails at its
start; this module names them, the one command that fetches them into the caches the run reads, and the offline
alternative. A Hub dataset of plain text with ``data.offline_fallback`` set needs nothing: the run trains on the
fallback, and says so.
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Callable
from pathlib import Path

from datasets.naming import camelcase_to_snakecase
from omegaconf import DictConfig

from gpt2lab import hub
from gpt2lab.errors import ConfigError
from gpt2lab.hf import pretrained_dir


@dataclasses.dataclass(frozen=True)
class Need:
    """One download a run makes at its start: the setting that names it, what it is, the Python statements that
    fetch it where the run looks, what to give instead offline, and whether the local cache has it (asked only
    once the Hub is known to be unreachable: asked online, it would download)."""

    setting: str  # model.init_from=gpt2
    what: str  # the pretrained weights
    fetch: tuple[str, str]  # the import and the call, for ``python -c``
    instead: str  # the offline alternative, as overrides
    in_cache: Callable[[], bool]


def hub_needs(cfg: DictConfig) -> list[Need]:
    """The Hub downloads a run of ``cfg`` makes at its start (none for local paths and offline sources)."""
    needs = []
    for key in ("init_from", "name_or_path"):
        name = cfg.model.get(key)
        if name and not Path(str(name)).expanduser().exists():
            needs.append(_model_need(f"model.{key}", str(name)))
    data = cfg.data
    records = data.get("format") not in (None, "plain")  # a task format has no offline corpus to fall back on
    if data.get("source") == "hub" and data.get("name") and (records or not data.get("offline_fallback")):
        hf_cache = Path(str(cfg.paths.cache_dir)).expanduser() / "hf"  # where gpt2lab.data has datasets cache it
        needs.append(_dataset_need(str(data.name), data.get("config_name"), hf_cache, records))
    return needs


def unmet_needs(cfg: DictConfig) -> tuple[list[Need], str]:
    """The downloads a run of ``cfg`` cannot make here, and why (``gpt2lab.hub``'s reason): none when it makes
    none or the Hub answers. The Hub is probed only for a run that downloads something."""
    needs = hub_needs(cfg)
    why = hub.go_offline_if_unreachable() if needs else None
    if not why:
        return [], ""
    return [n for n in needs if not n.in_cache()], why


def needs_first(needs: list[Need], why: str) -> str:
    """The lines a recommendation prints under its command when the run needs what is not here."""
    listed = "\n".join(f"  - {n.setting} ({n.what}); offline, give instead: {n.instead}" for n in needs)
    imports = list(dict.fromkeys(n.fetch[0] for n in needs))
    code = "; ".join([*imports, *(n.fetch[1] for n in needs)])
    return (
        f"Needs first, from the Hugging Face Hub (not in the local cache, and {why}):\n{listed}\n"
        f"  Fetch {'them' if len(needs) > 1 else 'it'} into the local cache from a shell that reaches the Hub "
        f'(HF_HUB_OFFLINE unset), then run the command above:\n    python -c "{code}"'
    )


def _model_need(key: str, name: str) -> Need:
    def in_cache() -> bool:
        try:
            return pretrained_dir(name, key).is_dir()  # offline: the local cache only
        except ConfigError:
            return False

    return Need(
        f"{key}={name}",
        "the pretrained weights",
        # the call a run makes, so that the files land where it looks
        ("from gpt2lab.hf import pretrained_dir", f"pretrained_dir({name!r}, {key!r})"),
        f"{key}=<a local GPT-2 directory in Hugging Face format>",
        in_cache,
    )


def _dataset_need(name: str, config_name: str | None, hf_cache: Path, records: bool) -> Need:
    # Where datasets looks for a dataset offline (its CachedDatasetModuleFactory): <cache>/<namespace>___<name>,
    # one directory per config, version and hash.
    parts = name.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = hf_cache / "___".join(parts)
    pattern = str(root / (config_name or "*") / "*" / "*" / "dataset_info.json")
    config = f", {config_name!r}" if config_name else ""
    return Need(
        f"data.name={name}",
        "the training data",
        ("import datasets", f"datasets.load_dataset({name!r}{config}, cache_dir={str(hf_cache)!r})"),
        "data.source=files data.path=<your .jsonl>" if records else "data.offline_fallback=pysource",
        lambda: bool(glob.glob(pattern)),
    )
