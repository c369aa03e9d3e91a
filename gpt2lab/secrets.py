"""Secrets kept out of what a run writes and logs, while the job itself gets the real values.

A secret is
- the password of a URL, such as an Optuna storage: ``postgresql://user:pw@host/db`` is written
  ``postgresql://user:***@host/db``;
- the value of a key named like a credential (``is_secret_key``: ``password``, ``token``, ``secret``, ``api_key``,
  ``access_key``, also as a suffix or in capitals: ``hf_token``, ``db_password``, ``WANDB_API_KEY``), written ``***``;
- wherever else it turns up (a log line, an error message), any such value this process was given, through the
  config or the environment: ``remember_secrets`` collects them. Values shorter than ``MIN_KNOWN`` characters are
  redacted only where their key or URL shows them, since as bare text they would match ordinary words.

``RedactSecrets`` is the Hydra callback (``conf/hydra/default.yaml``, so every entry point has it) that applies this
to what Hydra writes and logs itself: it rewrites ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` just
after ``run_job`` has written them (no hook runs before), and the sweep's ``multirun.yaml``; it redacts every log
record when it is created, whichever logger and handlers it goes through (Hydra replaces the handlers for each job),
and the command line the process reports (``sys.argv``, which wandb records with a run). ``redact_config`` is
for the files a task writes itself (``config.yaml``, logger hyper-parameters), after resolving interpolations such
as ``${oc.env:OPTUNA_STORAGE}``: the resolved value is the secret.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf

MASK = "***"
MIN_KNOWN = 8  # characters: a shorter known value is not searched for in free text
# Key names that hold credentials, matched at the end of the name, in any case ("-" read as "_").
SECRET_KEY = re.compile(
    r"(password|passwd|passphrase|secret|token|api_?key|access_?key|secret_?key|private_?key)$", re.I
)
# A tokenizer's special tokens (eos_token: "<|endoftext|>") are text, not credentials.
SPECIAL_TOKEN = re.compile(r"(bos|eos|pad|unk|sep|cls|mask)_?token$", re.I)
# scheme://[user]:password@host: the userinfo's password, up to the "@" (SQLAlchemy's reading of a URL)
URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)(?P<password>[^@\s]+)(?=@)", re.I)
# key=value: a Hydra override, a URL's query parameter, Hydra's override_dirname (a=1,b=2)
ASSIGNMENT = re.compile(r"(?P<key>[\w.-]+)=(?P<value>'[^']*'|\"[^\"]*\"|[^\s&,;'\"}\])]+)")
# {key: value} or {'key': 'value'}: a dict in an override (+logger.wandb.settings={api_key: ...}) or in a repr
DICT_ENTRY = re.compile(
    r"(?P<head>[{,]\s*(?P<q>['\"]?)(?P<key>[\w.-]+)(?P=q)\s*:\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^\s,}]+)"
)

_known: set[str] = set()  # secret values this process was given, to find in free text


def is_secret_key(name: Any) -> bool:
    """Whether a config key or environment variable named ``name`` holds a credential."""
    name = str(name).replace("-", "_")
    return bool(SECRET_KEY.search(name)) and not SPECIAL_TOKEN.search(name)


def redact(value: Any) -> Any:
    """``value`` with its secrets masked if it is text (URL passwords, ``key=value`` with a secret key, known
    secret values); anything else unchanged."""
    if not isinstance(value, str):
        return value
    text = URL_PASSWORD.sub(lambda m: m["head"] + MASK, value)
    text = ASSIGNMENT.sub(lambda m: f"{m['key']}={MASK}" if is_secret_key(m["key"]) else m[0], text)
    text = DICT_ENTRY.sub(lambda m: m["head"] + MASK if is_secret_key(m["key"]) else m[0], text)
    for secret in sorted(_known, key=len, reverse=True):  # the longest first: one may contain another
        text = text.replace(secret, MASK)
    return text


def redact_config(cfg: Any, resolve: bool = False) -> Any:
    """A copy of ``cfg`` (a DictConfig, mapping or list) as plain containers with its secrets masked: the value of
    every secret key (``***``; null and empty values stay as they are), and the secrets in any text. ``resolve``
    resolves a DictConfig's interpolations first, as a file of the resolved config shows them."""
    if isinstance(cfg, DictConfig | ListConfig):
        cfg = OmegaConf.to_container(cfg, resolve=resolve, enum_to_str=True)
    if isinstance(cfg, Mapping):
        return {k: MASK if is_secret_key(k) and v not in (None, "") else redact_config(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [redact_config(v) for v in cfg]
    return redact(cfg)


def remember_secrets(cfg: Any = None, environ: Mapping[str, str] | None = None) -> None:
    """Note the secret values in ``cfg`` (each node resolved where it resolves) and in the environment
    (``WANDB_API_KEY``, ``HF_TOKEN``, a URL with a password), so that ``redact`` finds them in any text."""
    found = list(_secret_values(cfg)) if cfg is not None else []
    for name, value in (os.environ if environ is None else environ).items():
        found += [value] if is_secret_key(name) else _url_passwords(value)
    for value in found:
        for form in {value, unquote(value)}:  # a URL's password may be percent-encoded
            if len(form) >= MIN_KNOWN:
                _known.add(form)


def _secret_values(node: Any, secret: bool = False) -> Iterable[str]:
    if isinstance(node, DictConfig | Mapping):
        for key in list(node.keys()):
            try:
                value = node[key]  # resolves an interpolation; one that cannot resolve yet is skipped
            except Exception:
                continue
            yield from _secret_values(value, secret or is_secret_key(key))
    elif isinstance(node, ListConfig | list | tuple):
        for i in range(len(node)):
            try:
                value = node[i]
            except Exception:
                continue
            yield from _secret_values(value, secret)
    elif isinstance(node, str | int) and not isinstance(node, bool):
        text = str(node)
        yield from [text] if secret else _url_passwords(text)
        if not secret:  # password=... in a URL's query or an override, {api_key: ...} in an override's dict
            for pattern in (ASSIGNMENT, DICT_ENTRY):
                yield from (m["value"].strip("'\"") for m in pattern.finditer(text) if is_secret_key(m["key"]))


def _url_passwords(text: str) -> list[str]:
    return [m["password"] for m in URL_PASSWORD.finditer(text)]


def redact_yaml_file(path: Path) -> None:
    """Rewrite a YAML file that OmegaConf wrote (Hydra's ``.hydra/*.yaml``, ``multirun.yaml``) with its secrets
    masked; its interpolations stay as written. A file without secrets is left untouched."""
    if not path.is_file():
        return
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    redacted = redact_config(data)
    if redacted != data:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(OmegaConf.to_yaml(redacted))
        os.replace(tmp, path)


def install_log_redaction() -> None:
    """Redact every log record as it is created: its message and its traceback (idempotent)."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts_secrets", False):
        return

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when the record is emitted
            return record
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if redact(text) != text:
                record.exc_text = redact(text)  # what a Formatter prints instead of formatting the traceback again
        return record

    redacting_factory.redacts_secrets = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)


class RedactSecrets(Callback):
    """``hydra.callbacks.redact_secrets``: see the module docstring."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        remember_secrets(config)  # now every value resolves, ${hydra:...} too, as the job will see it
        install_log_redaction()  # a launcher may run the job in a process of its own (joblib, submitit)
        if config.hydra.output_subdir is not None:
            hydra_dir = Path(config.hydra.runtime.output_dir) / config.hydra.output_subdir
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                redact_yaml_file(hydra_dir / name)
        if config.hydra.mode == RunMode.MULTIRUN:  # the sweeper writes it after on_multirun_start
            redact_yaml_file(Path(config.hydra.sweep.dir) / "multirun.yaml")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # The job's overrides as Hydra and the sweeper report them from here on (Hydra prints a failed job's to
        # stderr). End hooks run in reverse order: this one, listed first, runs after the others have had them.
        job_return.overrides = [redact(o) for o in job_return.overrides or []]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        redact_yaml_file(Path(config.hydra.sweep.dir) / "multirun.yaml")  # also when no job started

    @staticmethod
    def _start(config: DictConfig) -> None:
        remember_secrets(config)
        install_log_redaction()
        # Hydra has parsed the command line; what reads it from here on reports it (wandb records it with a run)
        sys.argv[:] = [redact(arg) for arg in sys.argv]
