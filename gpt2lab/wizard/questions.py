"""What the wizard asks and what it makes of the answers: the questions of each step, the session of answers and the
config they compose to (checked as ``train.py`` checks it), the summary, and the experiment file.

Composing is ``gpt2lab.config.compose_train`` inside one ``config_tree()`` for the whole session, cached here: the
wizard checks the config after every answer. Sizes come from the presets' own counting (``presets.recipe``).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from gpt2lab.config import compose_train, group_options, hydra_string
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT2Config
from gpt2lab.presets.catalog import Recipe, recipe
from gpt2lab.presets.probe import model_config
from gpt2lab.train.checks import validate_config

STEPS = ("Dataset", "Tokenizer", "Model check", "Training parameters", "Validation and summary")
FLAGS = ("--data", "--data-path", "--data-name", "--tokenizer", "--vocab-size", "--tokenizer-name", "--tokenizer-path",
         "--model", "--context-length", "--trainer", "--precision", "--batch-size", "--accumulate", "--optimizer",
         "--muon-lr", "--lr", "--scheduler", "--decay-fraction", "--warmup-steps", "--max-steps")  # fmt: skip


@dataclass
class Question:
    """One answer the wizard needs: ``key`` is a config group (``data``) or a dotted key (``data.path``)."""

    key: str
    flag: str
    text: str
    kind: type = str  # str, int or float
    choices: Callable[[], list[str]] | None = None
    check: Callable[[Any], None] | None = None  # more than the config can tell (a path that exists, ...)


@dataclass
class Session:
    """The answers so far, in the order they were given, and what they compose to."""

    preset: str
    answers: dict[str, Any] = field(default_factory=dict)
    token_counts: dict[str, int] | None = None
    tokenizer_vocab: int | None = None

    def overrides(self, extra: dict[str, Any] | None = None) -> list[str]:
        answers = {**self.answers, **(extra or {})}
        return [f"preset={self.preset}", *(f"{k}={_grammar(v)}" for k, v in answers.items())]

    def compose(self, extra: dict[str, Any] | None = None) -> DictConfig:
        return compose(tuple(self.overrides(extra)))

    def problems(self, extra: dict[str, Any] | None = None) -> list[str]:
        """validate_config's errors for the answers (and ``extra``), each set computed once."""
        return _problems(tuple(self.overrides(extra)), tuple(sorted((self.token_counts or {}).items())) or None)

    def sized(self) -> tuple[GPT2Config, Recipe]:
        """The model the run will build, with the vocabulary it will have, and its size and tokens per step, counted
        as the presets count them."""
        cfg = self.compose({"model.vocab_size": vocab_of(self.compose(), self)})
        return model_config(cfg), recipe(self.preset, cfg)


# -- composing -----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def compose(overrides: tuple[str, ...]) -> DictConfig:
    """``compose_train`` with Hydra's node (its record of the chosen options), read-only, its error on one line;
    each set of overrides composed once: the wizard checks after every answer."""
    try:
        cfg = compose_train(overrides, hydra_node=True)
    except ConfigError as e:
        raise ConfigError(str(e).replace("\n", " ")) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _grammar(value: Any) -> str:
    """A value in Hydra's override grammar: text quoted (``config.hydra_string``), so that a path with spaces,
    ``=`` or backslashes arrives as typed."""
    if isinstance(value, str) and not re.fullmatch(r"[\w./+-]+", value):
        return hydra_string(value)
    return str(value)


@functools.lru_cache(maxsize=256)
def _problems(overrides: tuple[str, ...], token_counts: tuple[tuple[str, int], ...] | None) -> list[str]:
    with quiet():  # its warnings (a warmup longer than the run, ...) are shown once, with the summary
        return validate_config(compose(overrides), dict(token_counts) if token_counts else None)[1]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No log lines while an answer is checked: the checks run after every answer, their warnings once at the end."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


# -- the questions -------------------------------------------------------------------------------------------------
def _path_exists(kind: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        expanded = os.path.expanduser(str(value))
        if not glob.glob(expanded):
            raise ConfigError(f"{kind}={value!r}: no such file or directory (looked for {os.path.abspath(expanded)})")

    return check


def questions(step: int, cfg: DictConfig) -> list[Question]:
    """The questions of a step, given what has been answered (``cfg``): data.path only for local files, etc."""
    if step == 1:
        return [Question("data", "--data", "Dataset (a conf/data option)", choices=lambda: group_options("data"))]
    if step == 2:
        return [Question("tokenizer", "--tokenizer", "Tokenizer", choices=lambda: group_options("tokenizer"))]
    if step == 3:
        return [
            Question(
                "model", "--model", "Model size", choices=lambda: [m for m in group_options("model") if "gpt2" in m]
            ),
            Question("model.context_length", "--context-length", "Context length (tokens)", int),
        ]
    if step == 4:
        asked = [
            Question("trainer", "--trainer", "Trainer (devices)", choices=lambda: group_options("trainer")),
            Question("trainer.precision", "--precision", "Precision (32-true, bf16-mixed, 16-mixed)"),
            Question("data.batch_size", "--batch-size", "Micro-batch size (windows per device per step)", int),
            Question(
                "trainer.accumulate_grad_batches", "--accumulate", "Gradient accumulation (micro-batches per step)", int
            ),
            Question("optimizer", "--optimizer", "Optimizer", choices=lambda: group_options("optimizer")),
            Question(
                "optimizer.lr", "--lr", "Peak learning rate (with muon: AdamW's, for embeddings and norms)", float
            ),
            Question("scheduler", "--scheduler", "Learning-rate schedule", choices=lambda: group_options("scheduler")),
        ]
        if cfg.get("scheduler") is not None:
            asked.append(Question("scheduler.warmup_steps", "--warmup-steps", "Warmup steps", int))
        return [*asked, Question("trainer.max_steps", "--max-steps", "Optimizer steps", int)]
    return []


def follow_ups(key: str, cfg: DictConfig) -> list[Question]:
    """Questions an answer opens: the path of local files, a Hub dataset's name, the tokenizer's size or file."""
    if key == "data" and cfg.data.get("source") == "files":
        return [Question("data.path", "--data-path", "Path to your text (a file, a directory or a glob)",
                         check=_path_exists("data.path"))]  # fmt: skip
    if key == "optimizer" and "muon_lr" in cfg.optimizer:
        return [
            Question("optimizer.muon_lr", "--muon-lr", "Muon's peak learning rate (attention and MLP matrices)", float)
        ]
    if key == "scheduler" and "decay_fraction" in (cfg.get("scheduler") or {}):
        return [Question("scheduler.decay_fraction", "--decay-fraction", "Fraction of the steps that decays", float)]
    if key == "data" and cfg.data.get("source") == "hub":
        return [Question("data.name", "--data-name", "Hub dataset name (e.g. wikitext)")]
    if key == "tokenizer":
        kind = cfg.tokenizer.kind
        if kind == "pretrained":
            return [Question("tokenizer.name", "--tokenizer-name", "Pretrained tokenizer (Hub name or tokenizer.json)")]
        if kind == "file":
            return [
                Question(
                    "tokenizer.path", "--tokenizer-path", "Your tokenizer.json", check=_path_exists("tokenizer.path")
                )
            ]
        return [Question("tokenizer.vocab_size", "--vocab-size", "Vocabulary size", int)]
    return []


def current_value(session: Session, key: str, cfg: DictConfig) -> Any:
    """The default of a question: the answer given, else the composed value (the preset's)."""
    if key in session.answers:
        return session.answers[key]
    if "." not in key:
        return cfg.hydra.runtime.choices.get(key)
    node, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, node)
    if parent is None or leaf not in parent or OmegaConf.is_missing(parent, leaf):
        return None
    return OmegaConf.select(cfg, key)


def vocab_of(cfg: DictConfig, session: Session) -> int:
    """The model's vocabulary: pinned, else the tokenizer's (measured, or the size it will be trained to)."""
    if cfg.model.get("vocab_size"):
        return cfg.model.vocab_size
    if session.tokenizer_vocab:
        return session.tokenizer_vocab
    return cfg.tokenizer.vocab_size if cfg.tokenizer.kind in ("bpe", "char", "auto") else 50257


def local_size(cfg: DictConfig) -> int | None:
    """Bytes of the run's local text; None when its data is not local files."""
    if cfg.data.get("source") != "files" or not cfg.data.get("path"):
        return None
    expanded = os.path.expanduser(str(cfg.data.path))
    files = (
        glob.glob(os.path.join(expanded, "**", "*"), recursive=True) if os.path.isdir(expanded) else glob.glob(expanded)
    )
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f))


# -- the summary and the file --------------------------------------------------------------------------------------
def describe(cfg: DictConfig, session: Session) -> list[str]:
    """The summary: what the run is, in the numbers that size it."""
    model, r = session.sized()
    data = cfg.data.path if cfg.data.source == "files" else (cfg.data.get("name") or cfg.data.source)
    lines = [
        f"preset     {session.preset}",
        f"data       {data}",
        f"tokenizer  {cfg.tokenizer.kind}, vocabulary {model.vocab_size:,}",
        f"model      {r.parameters:,} parameters: {model.num_layers} layers x {model.d_model} wide, "
        f"{model.num_heads} heads, context {model.context_length}",
        f"training   {r.steps:,} steps of {r.tokens_per_step:,} tokens ({r.micro_batch} x {r.accumulate} x "
        f"{r.devices} x {r.context}) = {r.total_tokens:,} tokens; {r.optimization}; {cfg.trainer.precision} on "
        f"{cfg.trainer.accelerator}",
    ]
    if session.token_counts:
        epochs = r.total_tokens / max(session.token_counts.get("train", 1), 1)
        lines.append(f"data size  {session.token_counts['train']:,} training tokens: {epochs:.1f} passes over them")
    return lines


def experiment_yaml(name: str, session: Session, summary: list[str]) -> str:
    """The experiment file: the preset and the chosen options as defaults overrides, the answers as values."""
    groups = {k: v for k, v in session.answers.items() if "." not in k}
    values: dict[str, Any] = {}
    for key, value in session.answers.items():
        if "." in key:
            node = values
            *parents, leaf = key.split(".")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    header = [
        "# @package _global_",
        f"# {name}: written by python -m gpt2lab.wizard from the preset {session.preset}. "
        f"Train it: python train.py experiment={name}",
        *(f"#   {line}" for line in summary),
    ]
    defaults = {"defaults": [{"override /preset": session.preset}, *({f"override /{g}": o} for g, o in groups.items())]}
    return (
        "\n".join(header)
        + "\n"
        + yaml.safe_dump(defaults, sort_keys=False)
        + "\n"
        + yaml.safe_dump(values, sort_keys=False)
    )
