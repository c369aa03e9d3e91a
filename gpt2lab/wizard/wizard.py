"""``python -m gpt2lab.wizard`` (``gpt2lab wizard``): a recipe of your own in five steps, written to
``conf/experiment/<name>.yaml`` for ``python train.py experiment=<name>``.

It starts from a preset (``conf/preset/*.yaml``, read now) and asks, step by step, for the dataset, the tokenizer,
the model (with a quick tier-1 check-up of it), the training parameters, then shows the summary and asks for a
name. Each answer is checked at once, as ``train.py`` would check it: the config is composed with it (Hydra's
schema refuses a misspelt value with its message) and ``validate_config`` run on it (``gpt2lab/config_checks.py``);
an answer that makes the run impossible is refused with the reason, and asked again. With ``--name`` it asks
nothing: every answer is its flag, or the preset's value, checked the same way, and the file is the one the same
answers typed in would write.

    python -m gpt2lab.wizard
    python -m gpt2lab.wizard --preset tiny --data files --data-path my.txt --max-steps 300 --name my_run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import execution_whitelist, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt2lab.config import TRUSTED_TARGETS, config_path, group_options, hydra_string, register_schemas
from gpt2lab.errors import ConfigError
from gpt2lab.lit.cpu_threads import use_free_cores
from gpt2lab.train.checks import validate_config

STEPS = ("Dataset", "Tokenizer", "Model check", "Training parameters", "Validation and summary")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
TOKENIZE_NOW_MAX_BYTES = 50_000_000  # local text up to this size is tokenized during the wizard (cached for training)
CHECK_NOW_MAX_PARAMETERS = 50_000_000  # the check-up is offered by default up to this size (seconds on a CPU)


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
        return compose_train(tuple(self.overrides(extra)))

    def problems(self, extra: dict[str, Any] | None = None) -> list[str]:
        """validate_config's errors for the answers (and ``extra``), each set computed once."""
        return _problems(tuple(self.overrides(extra)), tuple(sorted((self.token_counts or {}).items())) or None)


# -- composing -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def hydra_initialized() -> Iterator[None]:
    """Hydra on gpt2lab's config tree, as ``train.py`` has it, for the whole session."""
    register_schemas()
    GlobalHydra.instance().clear()
    path = config_path()
    context = (
        initialize_config_module(path.removeprefix("pkg://"), job_name="train")
        if path.startswith("pkg://")
        else initialize_config_dir(path, job_name="train")
    )
    with context:
        yield


@functools.lru_cache(maxsize=256)
def compose_train(overrides: tuple[str, ...]) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``, as ``python train.py`` composes it, read-only and with Hydra's node
    (its record of the chosen options); a value it refuses raises a ConfigError with Hydra's message. Each is
    composed once: the wizard checks after every answer."""
    try:
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        cause = f" ({e.__cause__})" if isinstance(e.__cause__, OmegaConfBaseException) else ""
        raise ConfigError(f"{e}{cause}".replace("\n", " ")) from None
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
        return validate_config(compose_train(overrides), dict(token_counts) if token_counts else None)[1]


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
            Question("optimizer.lr", "--lr", "Peak learning rate", float),
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


FLAGS = ("--data", "--data-path", "--data-name", "--tokenizer", "--vocab-size", "--tokenizer-name", "--tokenizer-path",
         "--model", "--context-length", "--trainer", "--precision", "--batch-size", "--accumulate", "--lr",
         "--warmup-steps", "--max-steps")  # fmt: skip


# -- asking and checking -------------------------------------------------------------------------------------------
class Wizard:
    """The five steps. ``ask`` puts a question to the person (``input``); None takes each answer from the flags,
    else the preset, through the same checks."""

    def __init__(self, args: argparse.Namespace, ask: Callable[[str], str] | None) -> None:
        self.args = args
        self.ask = ask  # None: answers come from the flags (and the preset)
        self.session = Session(preset=args.preset)

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def answer(self, question: Question) -> Any:
        """Ask (or take the flag), check, and record one answer; asked again, with the reason, until it passes."""
        cfg = self.session.compose()
        default = current_value(self.session, question.key, cfg)
        given = getattr(self.args, question.flag.lstrip("-").replace("-", "_"), None)
        options = question.choices() if question.choices else None
        while True:
            if self.ask is None:
                raw = default if given is None else given
                if raw is None:
                    raise ConfigError(f"{question.flag} is needed: {question.text.lower()}")
            else:
                shown = f" [{default}]" if default is not None else ""
                listed = f" ({', '.join(options)})" if options else ""
                raw = self.ask(f"  {question.text}{listed}{shown}: ").strip() or default
                if raw is None:
                    self.say("  ✗ an answer is needed")
                    continue
            try:
                value = self.check(question, raw, options)
            except ConfigError as e:
                if self.ask is None:
                    raise ConfigError(f"{question.flag}={raw}: {e}") from None
                self.say(f"  ✗ {e}")
                continue
            if self.ask is None:
                self.say(f"  {question.text}: {value}")
            return value

    def check(self, question: Question, raw: Any, options: list[str] | None) -> Any:
        """The answer as its type, refused when the config cannot take it or it makes the run impossible."""
        try:
            value = question.kind(raw)
        except (TypeError, ValueError):
            expected = {int: "a whole number", float: "a number"}.get(question.kind, "text")
            raise ConfigError(f"{raw!r} is not {expected}") from None
        if options is not None and value not in options:
            raise ConfigError(f"{value!r} is not one of {', '.join(options)}")
        if question.check:
            question.check(value)
        if question.key == "data.path":
            value = str(Path(os.path.expanduser(value)).resolve()) if not glob.has_magic(value) else value
        before = self.session.problems()
        cfg = self.session.compose({question.key: value})  # the schema's verdict: Hydra's message
        if "." in question.key:  # a group's option is judged by the values asked after it (its context, ...)
            caused = [p for p in self.session.problems({question.key: value}) if p not in before or question.key in p]
            if caused:
                raise ConfigError("; ".join(caused))
        if question.key.startswith("trainer"):
            self.check_trainer(cfg)
        self.session.answers[question.key] = value
        return value

    def check_trainer(self, cfg: DictConfig) -> None:
        """Lightning's own verdict on the trainer settings (a GPU that is not there, a precision it does not know):
        the Trainer is built, as train.py builds it, with nothing attached."""
        from gpt2lab.lit.trainer import make_trainer

        with quiet(), execution_whitelist(TRUSTED_TARGETS):
            make_trainer(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip

    # -- the five steps --------------------------------------------------------------------------------------------
    def run(self) -> Path:
        self.say(
            f"gpt2lab wizard: a recipe from the preset {self.session.preset!r}; Enter keeps the value in brackets."
        )
        for step in range(1, 5):
            self.say(f"\nStep {step}/5 · {STEPS[step - 1]}")
            self.ask_step(step)
            if step == 2:
                self.measure_data()
            if step == 3:
                self.model_check()
        self.say("\nStep 5/5 · Validation and summary")
        while True:
            ok, errors = validate_config(self.session.compose(), self.session.token_counts)
            if ok:
                break
            if self.ask is None:
                raise ConfigError("the settings do not make a run: " + "; ".join(errors))
            for error in errors:
                self.say(f"  ✗ {error}")
            self.say("  Back to the model and the training parameters:")
            self.ask_step(3)
            self.ask_step(4)
        summary = describe(self.session.compose(), self.session)
        for line in summary:
            self.say(f"  {line}")
        return self.write(summary)

    def ask_step(self, step: int) -> None:
        for question in questions(step, self.session.compose()):
            self.answer(question)
            for follow_up in follow_ups(question.key, self.session.compose()):
                self.answer(follow_up)

    def measure_data(self) -> None:
        """Tokenize local text now (it is cached: training starts from these files), so that the context and batch
        are checked against its token counts; other data is counted when training starts."""
        cfg = self.session.compose()
        size = _local_size(cfg)
        if size is None or size > TOKENIZE_NOW_MAX_BYTES:
            why = "it is not local text" if size is None else f"{size / 1e6:.0f} MB is more than the wizard reads"
            self.say(f"  Token counts: measured when training starts ({why})")
            return
        self.say(f"  Tokenizing {cfg.data.path} ({size / 1e6:.1f} MB) to check the context against it ...")
        with execution_whitelist(TRUSTED_TARGETS):
            data, tokenizer = (OmegaConf.to_container(node, resolve=True) for node in (cfg.data, cfg.tokenizer))
            datamodule = instantiate(data, tokenizer=instantiate(tokenizer))
        datamodule.prepare_data()
        self.session.token_counts = {split: s["tokens"] for split, s in datamodule.stats.items()}
        self.session.tokenizer_vocab = datamodule.tokenizer.get_vocab_size()
        counts = ", ".join(f"{split} {n:,}" for split, n in self.session.token_counts.items())
        self.say(f"  Tokens: {counts} (vocabulary {self.session.tokenizer_vocab:,})")

    def model_check(self) -> None:
        """Tier 1 of the check-up (gpt2lab/checkup/critical.py), shortened to a few seconds for a small model."""
        from gpt2lab.checkup import CheckConfig, failed, format_table, run_all_tier1_tests
        from gpt2lab.model import GPT2Model

        config = model_config(self.session.compose(), self.session)
        parameters = count_parameters(config)
        wanted = self.args.check
        if wanted is None and self.ask is not None:
            default = "Y/n" if parameters <= CHECK_NOW_MAX_PARAMETERS else "y/N"
            reply = self.ask(f"  Run the model check-up now ({parameters:,} parameters; tier 1)? [{default}]: ").strip()
            wanted = reply.lower().startswith("y") if reply else parameters <= CHECK_NOW_MAX_PARAMETERS
        if not wanted:
            self.say(f"  Model: {parameters:,} parameters (check-up skipped: python -m gpt2lab.check runs it)")
            return
        started = time.perf_counter()
        use_free_cores()  # as python -m gpt2lab.check does on a CPU: a busy machine gets fewer threads
        model = GPT2Model(config)
        short = CheckConfig(batch_sizes=[1], probe_length=min(32, config.context_length), batch_size=1,
                            throughput_seconds=0.2)  # fmt: skip
        results = run_all_tier1_tests(model, short)
        self.say(format_table(results))
        verdict = f"failed: {', '.join(failed(results))}" if failed(results) else "passed"
        self.say(f"  Model check-up {verdict} in {time.perf_counter() - started:.1f} s")

    def write(self, summary: list[str]) -> Path:
        directory = Path(self.args.config_dir) / "experiment"
        name = self.args.name
        while True:
            if name is None:
                name = self.ask("  Experiment name: ").strip() if self.ask else None
            problem = name_problem(name, directory, self.args.force)
            if problem is None:
                break
            if self.ask is None:
                raise ConfigError(problem)
            self.say(f"  ✗ {problem}")
            name = None
        path = directory / f"{name}.yaml"
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(experiment_yaml(name, self.session, summary))
        searchpath = (
            ""
            if same_path(directory.parent, config_path())
            else f" 'hydra.searchpath=[file://{directory.parent.resolve()}]'"
        )
        self.say(f"\nWrote {path}\nTrain with: python train.py experiment={name}{searchpath}")
        return path


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


def model_config(cfg: DictConfig, session: Session) -> Any:
    """The GPT2Config the run will build, with the vocabulary it will have."""
    from gpt2lab.model import GPT2Config

    fields = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"}
    return GPT2Config(**{**fields, "vocab_size": vocab_of(cfg, session)})


def count_parameters(config: Any) -> int:
    import torch

    from gpt2lab.model import GPT2Model

    with torch.device("meta"):  # sizes only: no memory, no initialisation
        return GPT2Model(config).num_parameters()


def describe(cfg: DictConfig, session: Session) -> list[str]:
    """The summary: what the run is, in the numbers that size it."""
    model = model_config(cfg, session)
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > 0 else 1
    per_step = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * devices * cfg.model.context_length
    data = cfg.data.path if cfg.data.source == "files" else (cfg.data.get("name") or cfg.data.source)
    lines = [
        f"preset     {session.preset}",
        f"data       {data}",
        f"tokenizer  {cfg.tokenizer.kind}, vocabulary {model.vocab_size:,}",
        f"model      {count_parameters(model):,} parameters: {model.num_layers} layers x {model.d_model} wide, "
        f"{model.num_heads} heads, context {model.context_length}",
        f"training   {cfg.trainer.max_steps:,} steps of {per_step:,} tokens ({cfg.data.batch_size} x "
        f"{cfg.trainer.accumulate_grad_batches} x {devices} x {cfg.model.context_length}) = "
        f"{per_step * cfg.trainer.max_steps:,} tokens; lr {cfg.optimizer.lr}, {cfg.trainer.precision} on "
        f"{cfg.trainer.accelerator}",
    ]
    if session.token_counts:
        epochs = per_step * cfg.trainer.max_steps / max(session.token_counts.get("train", 1), 1)
        lines.append(f"data size  {session.token_counts['train']:,} training tokens: {epochs:.1f} passes over them")
    return lines


def name_problem(name: str | None, directory: Path, force: bool) -> str | None:
    if not name:
        return "an experiment name is needed (--name)"
    if not NAME.fullmatch(name):
        return f"name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
    if (directory / f"{name}.yaml").exists() and not force:
        return f"{directory / name}.yaml exists: choose another name, or pass --force to replace it"
    return None


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


def _local_size(cfg: DictConfig) -> int | None:
    if cfg.data.get("source") != "files" or not cfg.data.get("path"):
        return None
    expanded = os.path.expanduser(str(cfg.data.path))
    files = (
        glob.glob(os.path.join(expanded, "**", "*"), recursive=True) if os.path.isdir(expanded) else glob.glob(expanded)
    )
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f))


def same_path(a: Path, b: str) -> bool:
    return not b.startswith("pkg://") and a.resolve() == Path(b).resolve()


# -- command line --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    default_dir = config_path() if not config_path().startswith("pkg://") else "conf"
    parser = argparse.ArgumentParser(
        prog="python -m gpt2lab.wizard",
        description="Write conf/experiment/<name>.yaml in five steps: dataset, tokenizer, model check, training "
        "parameters, validation and summary. With --name it asks nothing: each answer is its flag or the preset's.",
    )
    parser.add_argument(
        "--preset", default=None, help=f"the recipe to start from: {', '.join(group_options('preset'))}"
    )
    parser.add_argument("--name", help="the experiment's name; given, the wizard asks nothing")
    for flag in FLAGS:
        parser.add_argument(flag, default=None, metavar="VALUE")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                        help="run the model check-up (asked when interactive; off with --name unless given)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace an experiment of that name")
    parser.add_argument("--config-dir", default=default_dir, help="the config tree the experiment goes into")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m gpt2lab.wizard`` and ``gpt2lab wizard``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    interactive = args.name is None
    presets = group_options("preset")
    try:
        if args.preset is None:
            args.preset = "tiny" if not interactive else ask_preset(presets)
        if args.preset not in presets:
            raise ConfigError(
                f"--preset={args.preset}: no conf/preset/{args.preset}.yaml; presets: {', '.join(presets)}"
            )
        with hydra_initialized():
            Wizard(args, ask=input if interactive else None).run()
    except ConfigError as e:
        print(f"\nError: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except (EOFError, KeyboardInterrupt):
        print("\nStopped: nothing written.", file=sys.stderr)
        raise SystemExit(130) from None


def ask_preset(presets: list[str]) -> str:
    """The first question: the preset the defaults come from, with each one's first comment line."""
    from gpt2lab.presets.catalog import read_header  # its description line, also from an installed gpt2lab

    print("Presets:")
    for preset in presets:
        print(f"  {preset:18s} {read_header(preset).description[:90]}")
    while True:
        answer = input(f"  Start from which preset? ({', '.join(presets)}) [tiny]: ").strip() or "tiny"
        if answer in presets:
            return answer
        print(f"  ✗ {answer!r} is not one of {', '.join(presets)}")


if __name__ == "__main__":
    main()
