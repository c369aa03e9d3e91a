"""The wizard: a recipe of your own in five steps, written to ``conf/experiment/<name>.yaml`` for
``python train.py experiment=<name>``.

It starts from a preset (``conf/preset/*.yaml``, read now) and asks, step by step, for the dataset, the tokenizer,
the model (with a quick tier-1 check-up of it), the training parameters, then shows the summary and asks for a
name. Each answer is checked at once, as ``train.py`` would check it: the config is composed with it (Hydra's
schema refuses a misspelt value with its message) and ``validate_config`` run on it (``gpt2lab/train/checks.py``);
an answer that makes the run impossible is refused with the reason, and asked again. Without ``ask`` it asks
nothing: every answer is its flag, or the preset's value, checked the same way, and the file is the one the same
answers typed in would write.
"""

from __future__ import annotations

import argparse
import glob
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import execution_whitelist, instantiate
from omegaconf import DictConfig, OmegaConf

from gpt2lab.config import TRUSTED_TARGETS, config_path
from gpt2lab.config.experiments import write_experiment
from gpt2lab.errors import ConfigError
from gpt2lab.lit.cpu_threads import use_free_cores
from gpt2lab.presets.catalog import read_header
from gpt2lab.train.checks import validate_config
from gpt2lab.wizard.questions import (
    STEPS,
    Question,
    Session,
    current_value,
    describe,
    experiment_yaml,
    follow_ups,
    local_size,
    questions,
    quiet,
)

TOKENIZE_NOW_MAX_BYTES = 50_000_000  # local text up to this size is tokenized during the wizard (cached for training)
CHECK_NOW_MAX_PARAMETERS = 50_000_000  # the check-up is offered by default up to this size (seconds on a CPU)
PRESET_LINE_WIDTH = 100  # characters of a line of the preset list, descriptions wrapped to fit


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
        size = local_size(cfg)
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

        config, sizes = self.session.sized()
        parameters = sizes.parameters
        wanted = self.args.check
        if wanted is None and self.ask is not None:
            default = "Y/n" if parameters <= CHECK_NOW_MAX_PARAMETERS else "y/N"
            reply = self.ask(f"  Run the model check-up now ({parameters:,} parameters; tier 1)? [{default}]: ").strip()
            wanted = reply.lower().startswith("y") if reply else parameters <= CHECK_NOW_MAX_PARAMETERS
        if not wanted:
            self.say(f"  Model: {parameters:,} parameters (check-up skipped: python -m gpt2lab.check runs it)")
            return
        started = time.perf_counter()
        model = GPT2Model(config)
        short = CheckConfig(batch_sizes=[1], probe_length=min(32, config.context_length), batch_size=1,
                            throughput_seconds=0.2)  # fmt: skip
        with use_free_cores():  # as python -m gpt2lab.check does on a CPU: a busy machine gets fewer threads
            results = run_all_tier1_tests(model, short)
        self.say(format_table(results))
        verdict = f"failed: {', '.join(failed(results))}" if failed(results) else "passed"
        self.say(f"  Model check-up {verdict} in {time.perf_counter() - started:.1f} s")

    def write(self, summary: list[str]) -> Path:
        """The experiment file, under a name asked for (or ``--name``); an existing one only replaced with
        ``--force``."""
        name = self.args.name
        while True:
            if name is None:
                name = self.ask("  Experiment name: ").strip() if self.ask else None
            try:
                path = write_experiment(name, experiment_yaml(name, self.session, summary), self.args.config_dir,
                                        overwrite=self.args.force, to_replace="pass --force")  # fmt: skip
                break
            except ConfigError as e:
                if self.ask is None:
                    raise
                self.say(f"  ✗ {e}")
                name = None
        config_dir = Path(self.args.config_dir)
        own = not config_path().startswith("pkg://") and config_dir.resolve() == Path(config_path()).resolve()
        searchpath = "" if own else f" 'hydra.searchpath=[file://{config_dir.resolve()}]'"
        self.say(f"\nWrote {path}\nTrain with: python train.py experiment={name}{searchpath}")
        return path


def ask_preset(presets: list[str]) -> str:
    """The first question: the preset the defaults come from, with each one's whole description, wrapped at word
    boundaries under the descriptions' column."""
    print("Presets:")
    for preset in presets:
        lead = f"  {preset:18s} "
        description = read_header(preset).description
        width = PRESET_LINE_WIDTH - len(lead)
        lines = textwrap.wrap(description, width, break_long_words=False, break_on_hyphens=False) or [""]
        print(lead + f"\n{' ' * len(lead)}".join(lines))
    while True:
        answer = input(f"  Start from which preset? ({', '.join(presets)}) [tiny]: ").strip() or "tiny"
        if answer in presets:
            return answer
        print(f"  ✗ {answer!r} is not one of {', '.join(presets)}")
