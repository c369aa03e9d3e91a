"""The plan of a training run: the composed ``conf/train.yaml`` resolved into the read-only config that the stages
of ``gpt2lab.train.run`` read, so that no stage changes the config as it travels and ``config.yaml`` records
what ran.

``resolve_plan`` settles, before any work, what the config alone decides: every setting checked together,
``scheduler=null`` as no scheduler, what a pretrained source sets (``model.init_from``'s architecture, ``model=hf``'s
context and vocabulary), the tokenizer, and ``trainer.time_budget`` as ``trainer.max_steps`` and ``trainer.max_time``.
Two values wait for a stage: the vocabulary, for the data's tokenizer (``Plan.with_vocabulary``), and the file that
``ckpt_path=last`` or ``auto`` names, for the model (``Plan.resuming``). Each gives a new plan over a new read-only
config; the caller's config is never written to.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from gpt2lab.checkpoint import resolve_ckpt_path
from gpt2lab.config import given_on_command_line
from gpt2lab.console import parse_duration
from gpt2lab.errors import ConfigError
from gpt2lab.hf import grow_vocab, import_model_config
from gpt2lab.model.adapter import is_gpt2
from gpt2lab.presets.probe import measure_throughput, steps_for_budget
from gpt2lab.tokenizers import TokenizerSpec, check_model_vocab
from gpt2lab.tokenizers.build import load_file, load_pretrained
from gpt2lab.train.checks import raise_if_invalid

log = logging.getLogger("gpt2lab.train")
# The schedule is fitted to this share of the budget: the first steps' warm-up (and torch.compile's compilation)
# and checkpoint writes take the rest. max_time stops training at the budget plus a margin whatever happens.
BUDGET_SHARE = 0.95
MAX_TIME_MARGIN = 0.05


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a training run does, as its stages read it. ``cfg`` is read-only: a stage that learns a value gets a
    new plan from ``with_vocabulary`` or ``resuming`` instead of writing the value into the config."""

    cfg: DictConfig
    output_dir: Path
    gpt2: bool  # gpt2lab's GPT-2 (samples, model.init_from), not model=hf or model=module
    tokenizer: TokenizerSpec  # the configured one, or the one the pretrained weights were trained with
    pretrained_tokenizer: bool
    started: float  # time.time() when the run began, for results.json's duration_s
    vocab_size: int | None = None  # the model's vocabulary, once the data's tokenizer is built
    resume_from: str | None = None  # the checkpoint file the run goes on from, once the model is known

    def with_vocabulary(self, tokenizer: Tokenizer) -> Plan:
        """The plan for the data's tokenizer: tokens a data format added to a pretrained one (``data.format=chat``'s)
        get rows of their own; ``model.vocab_size`` unset follows the tokenizer. A model that gpt2lab does not build
        itself reads the vocabulary from the config (``${model.vocab_size}`` in its arguments), so it goes there."""
        cfg = _writable_copy(self.cfg)
        if self.pretrained_tokenizer:
            grow_vocab(cfg.model, tokenizer)
        vocab_size = cfg.model.vocab_size or tokenizer.get_vocab_size()
        check_model_vocab(tokenizer, vocab_size)  # the datamodule has validated the tokenizer itself
        if not self.gpt2:
            cfg.model.vocab_size = vocab_size
        return dataclasses.replace(self, cfg=_read_only(cfg), vocab_size=vocab_size)

    def resuming(self, checkpoint: str | None) -> Plan:
        """The plan going on from ``checkpoint``, which ``config.yaml`` then records instead of ``last`` or
        ``auto``; the same plan when the run starts afresh."""
        if not checkpoint:
            return self
        cfg = _writable_copy(self.cfg)
        cfg.ckpt_path = checkpoint
        return dataclasses.replace(self, cfg=_read_only(cfg), resume_from=checkpoint)


def resolve_plan(cfg: DictConfig) -> Plan:
    """The plan of a run of ``cfg`` (``conf/train.yaml`` as composed), checked and resolved before any work: a bad
    setting, a missing checkpoint or pretrained source, and a bad time budget all fail here."""
    started = time.time()
    cfg = _writable_copy(cfg)
    if cfg.scheduler is not None and not cfg.scheduler.get("_target_"):  # scheduler=null: no scheduler group
        cfg.scheduler = None
        log.info("Learning rate: constant optimizer.lr=%s (no scheduler)", cfg.optimizer.lr)
    raise_if_invalid(cfg)  # every impossible setting at once (gpt2lab/train/checks.py)
    if torch.cuda.is_available():  # CPU runs keep exact fp32 matmuls; the time budget's probe measures with it
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    output_dir = Path(cfg.paths.output_dir)
    resolve_ckpt_path(cfg.ckpt_path, cfg.paths.log_dir, exclude=output_dir)  # a missing checkpoint fails here
    # model.init_from / model=hf: their source checked, and the architecture, context or vocabulary it sets
    before = OmegaConf.to_container(cfg.model)
    tokenizer_source = import_model_config(cfg.model)
    refuse_overridden_weights(before, cfg.model)
    for key, value in time_budget(cfg).items():
        OmegaConf.update(cfg, key, value, merge=False)
    tokenizer = instantiate(cfg.tokenizer)
    pretrained_tokenizer = bool(tokenizer_source) and not given_on_command_line("tokenizer")
    if tokenizer_source and not pretrained_tokenizer:
        check_same_vocabulary(tokenizer, tokenizer_source, cfg.model)
    if pretrained_tokenizer:  # pretrained weights come with their tokenizer
        tokenizer = TokenizerSpec(kind="pretrained", name=tokenizer_source)
        log.info(
            "Tokenizer: %s's, which its weights were trained with (tokenizer=... chooses another)", tokenizer_source
        )
    return Plan(_read_only(cfg), output_dir, is_gpt2(cfg.model), tokenizer, pretrained_tokenizer, started)


def refuse_overridden_weights(before: dict[str, Any], model: DictConfig) -> None:
    """Pretrained weights set the architecture (``model.init_from``, or ``model=hf``'s vocabulary): a value the
    command line gives for one of those keys must agree with them, since values given there always win."""
    changed = [
        key for key, value in before.items()
        if key not in ("init_from", "name_or_path") and model.get(key) != value and given_on_command_line(f"model.{key}")
    ]  # fmt: skip
    if changed:
        given = ", ".join(f"model.{key}={before[key]}" for key in changed)
        weights = ", ".join(f"{key}={model[key]}" for key in changed)
        raise ConfigError(
            f"{given}: {_source(model)}'s weights have {weights}. Drop {given} from the command line to train those "
            "weights, or drop the pretrained weights to train the architecture you give"
        )


def check_same_vocabulary(spec: TokenizerSpec, source: str, model: DictConfig) -> None:
    """Pretrained weights read the token ids of their own tokenizer: ``tokenizer=...`` given beside them must have
    the same vocabulary, or its ids would index embeddings trained for other tokens."""
    kind = spec.resolve_kind()
    given = f"tokenizer={kind}"
    if kind in ("file", "pretrained") and (spec.path or spec.name):
        given = f"tokenizer.path={spec.path}" if kind == "file" else f"tokenizer.name={spec.name}"
        other = load_file(spec.path) if kind == "file" else load_pretrained(spec.name)
        if other.get_vocab() == load_pretrained(source).get_vocab():
            return
    raise ConfigError(
        f"{given}: {_source(model)}'s weights were trained with the tokenizer of {source}, and this one has another "
        "vocabulary, whose ids would index embeddings learned for other tokens. Drop tokenizer=... to use the "
        "weights' own, or give one with the same vocabulary"
    )


def _source(model: DictConfig) -> str:
    key = "model.init_from" if model.get("init_from") else "model.name_or_path"
    return f"{key}={model.get('init_from') or model.get('name_or_path')}"


def time_budget(cfg: DictConfig) -> dict[str, Any]:
    """What ``trainer.time_budget=2h`` sets, as ``{key: value}``: ``trainer.max_steps`` from the measured time of a
    step of this run's model on this device (``gpt2lab.presets``' probe, cached per device and config), so that
    warmup and cosine decay (whose ``scheduler.max_steps`` follows ``trainer.max_steps``) end within the budget;
    and ``trainer.max_time``, the budget plus a small margin, so that training also stops cleanly there if the
    estimate was short. Nothing without a budget."""
    budget = cfg.trainer.get("time_budget")
    if budget is None or (cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available()):
        return {}  # (no GPU for a GPU run: make_trainer says so next, with the fix, before anything is measured)
    seconds = parse_duration(str(budget), key="trainer.time_budget")
    steps, why = steps_for_budget(cfg, seconds * BUDGET_SHARE, measure_throughput(cfg))
    values: dict[str, Any] = {"trainer.max_steps": steps}
    warmup = cfg.scheduler.get("warmup_steps") if cfg.get("scheduler") else None
    if warmup and warmup * 2 > steps:  # a warmup longer than half the run would leave no decay
        values["scheduler.warmup_steps"] = max(1, steps // 10)
        why += f"; scheduler.warmup_steps {warmup} -> {values['scheduler.warmup_steps']} (a tenth of the steps)"
    days, rest = divmod(math.ceil(seconds + max(10.0, MAX_TIME_MARGIN * seconds)), 86400)
    max_time = values["trainer.max_time"] = f"{days:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    if cfg.trainer.get("max_time") not in (None, max_time):
        log.info("trainer.time_budget replaces trainer.max_time=%s", cfg.trainer.max_time)
    log.info(
        "trainer.time_budget=%s: trainer.max_steps=%d (%s), so that warmup and cosine decay end within %d%% of the "
        "budget; trainer.max_time=%s stops training there in any case",
        budget, steps, why, round(BUDGET_SHARE * 100), max_time,
    )  # fmt: skip
    return values


def _writable_copy(cfg: DictConfig) -> DictConfig:
    copied = copy.deepcopy(cfg)
    OmegaConf.set_readonly(copied, False)
    return copied


def _read_only(cfg: DictConfig) -> DictConfig:
    OmegaConf.set_readonly(cfg, True)
    return cfg
