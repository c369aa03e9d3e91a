"""``validate_config``: every check a composed training config must pass before any work starts, run together
so that a config with three problems is told all three at once.

It gathers the checks that already live beside the code they protect (``GPT2Config`` refuses heads that do
not divide the width, ``check_optimization`` a negative learning rate, ...) and adds those that need several
groups at once: the vocabulary of the model against the tokenizer's, the context against the data's token
counts (when they are known), the batch layout against the data, and the precision against the device.
A training run's plan (``gpt2lab/train/plan.py``) and the setup wizard (``gpt2lab/wizard/``) both call it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import torch
from hydra.utils import execution_whitelist, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, InterpolationValidationError, MissingMandatoryValue

from gpt2lab.config import TRUSTED_TARGETS
from gpt2lab.data.datamodule import TokenBlockDataset
from gpt2lab.errors import ConfigError
from gpt2lab.lit.float8 import check_float8
from gpt2lab.lit.module import check_compile_options
from gpt2lab.lit.optimization import check_optimization, is_muon, muon_groups
from gpt2lab.lit.trainer import check_fsdp_world, check_launch, uses_fsdp
from gpt2lab.model.adapter import build_model, is_gpt2
from gpt2lab.tokenizers import check_model_vocab

MATMUL_PRECISIONS = ("highest", "high", "medium")
# Tokenizer kinds whose vocabulary is tokenizer.vocab_size (pretrained and file ones have their own)
SIZED_TOKENIZERS = ("bpe", "char", "auto")


def validate_config(cfg: DictConfig, token_counts: Mapping[str, int] | None = None) -> tuple[bool, list[str]]:
    """``(ok, errors)`` for a composed ``conf/train.yaml``: each error is one message that names the keys and
    the fix. ``token_counts`` (tokens per split, e.g. a datamodule's ``stats``) adds the checks against the
    data; without it they are left to the data module, which runs them once the data is tokenized."""
    checks: list[Callable[[], None]] = [
        lambda: _matmul_precision(cfg),
        lambda: check_compile_options(cfg),
        lambda: check_launch(cfg.trainer),
        lambda: check_fsdp_world(cfg.trainer),
        lambda: _length(cfg.trainer),
        lambda: check_optimization(cfg.optimizer, cfg.scheduler, cfg.trainer.max_steps),
        lambda: _model(cfg),
        lambda: _muon(cfg),
        lambda: _vocabulary(cfg),
        lambda: _data_and_batch(cfg),
        lambda: _accumulation(cfg),
        lambda: _device_precision(cfg),
        lambda: check_float8(cfg.model, cfg.trainer),
    ]
    if token_counts is not None:
        checks.append(lambda: _windows(cfg, token_counts))
    errors = []
    for check in checks:
        try:
            check()
        except ConfigError as e:
            errors.append(str(e))
        except Exception as e:  # Hydra wraps what a constructor raises; its ConfigError is the message
            cause = e
            while cause is not None and not isinstance(cause, ConfigError):
                cause = cause.__cause__
            missing = getattr(e, "full_key", None) if isinstance(e, MissingMandatoryValue) else None
            if isinstance(e, InterpolationToMissingValueError):  # data.max_length: ${model.context_length}
                missing = _first_missing(cfg)
            if cause is None and missing:  # a ??? of a config group (model=module's model.context_length)
                errors.append(f"{missing} has no value, and this run needs one: add {missing}=<value> to the command")
                continue
            errors.append(str(cause) if cause is not None else f"{type(e).__name__}: {e}")
    return not errors, errors


def _length(trainer: DictConfig) -> None:
    """A run takes at least one step: ``max_steps=0`` would test and sample an untrained model and report the
    run finished."""
    steps = trainer.get("max_steps")
    if steps is not None and (steps == 0 or steps < -1):
        raise ConfigError(
            f"trainer.max_steps={steps}: expected a positive number of optimizer steps, or -1 to train for "
            "trainer.max_epochs (to score a model without training it: python -m gpt2lab.evaluate ckpt=...)"
        )


def _first_missing(cfg: DictConfig) -> str | None:
    """The first key of the run's config set to ``???`` itself (not one interpolating it), outside ``hydra.``."""
    for key in sorted(OmegaConf.missing_keys(cfg)):
        parent, _, leaf = key.rpartition(".")
        if not key.startswith("hydra.") and OmegaConf.is_missing(
            OmegaConf.select(cfg, parent) if parent else cfg, leaf
        ):
            return key
    return None


def raise_if_invalid(cfg: DictConfig, token_counts: Mapping[str, int] | None = None) -> None:
    """One ``ConfigError`` listing every problem ``validate_config`` finds (the message itself when there is
    one, so that it reads as the single check's own)."""
    ok, errors = validate_config(cfg, token_counts)
    if ok:
        return
    if len(errors) == 1:
        raise ConfigError(errors[0])
    raise ConfigError(f"{len(errors)} problems in the config:\n" + "\n".join(f"  - {e}" for e in errors))


def _matmul_precision(cfg: DictConfig) -> None:
    if cfg.float32_matmul_precision not in MATMUL_PRECISIONS:
        raise ConfigError(
            f"float32_matmul_precision={cfg.float32_matmul_precision!r}: expected highest, high or medium"
        )


def _model(cfg: DictConfig) -> None:
    """GPT2Config's own checks (sizes positive, heads dividing the width, dropout in [0, 1)). With
    model.init_from the architecture comes from the checkpoint's config.json, which train.py reads later."""
    if is_gpt2(cfg.model) and not cfg.model.get("init_from"):
        with execution_whitelist(TRUSTED_TARGETS):
            instantiate(_plain(cfg.model))


def _muon(cfg: DictConfig) -> None:
    """``optimizer=muon`` needs whole weight matrices, which FSDP splits into flat shards, and a model that has
    hidden ones (built here on the meta device, so no memory is taken: gpt2lab's GPT-2, or ``model=module``'s own
    class; ``model=hf`` is checked once it is loaded)."""
    if not is_muon(cfg.optimizer):
        return
    if uses_fsdp(cfg.trainer):
        raise ConfigError(
            "optimizer=muon with trainer=fsdp: Muon orthogonalises each weight matrix whole, and FSDP gives each GPU "
            "flat slices of them. Use trainer=ddp with optimizer=muon, or optimizer=adamw with trainer=fsdp"
        )
    if cfg.model.get("init_from") or cfg.model.get("_target_") == "gpt2lab.hf.causal_lm":
        return
    spec = OmegaConf.to_container(cfg.model, resolve=True)
    if spec.get("vocab_size") is None and cfg.tokenizer.kind in SIZED_TOKENIZERS:
        spec["vocab_size"] = cfg.tokenizer.vocab_size
    try:
        with torch.device("meta"), execution_whitelist(TRUSTED_TARGETS):
            model = build_model(spec)
    except Exception:  # a model that cannot be built here: its own check says why, or the run builds it later
        return
    muon_groups(model, 0.0)


def _vocabulary(cfg: DictConfig) -> None:
    """A model.vocab_size pinned below the tokenizer's: ids the embedding has no row for."""
    model_vocab, tokenizer = cfg.model.get("vocab_size"), cfg.tokenizer
    if model_vocab is None or tokenizer.kind not in SIZED_TOKENIZERS or not is_gpt2(cfg.model):
        return
    # check_model_vocab reads only get_vocab_size(): the tokenizer this config will build has tokenizer.vocab_size
    check_model_vocab(types.SimpleNamespace(get_vocab_size=lambda: tokenizer.vocab_size), model_vocab)


def _data_and_batch(cfg: DictConfig) -> None:
    """The data module's and tokenizer's constructor checks (batch size, window length, tokenizer kind):
    they read no data. A context that comes from elsewhere (model=hf with its own) is known only later."""
    if _context(cfg) is None:
        return
    with execution_whitelist(TRUSTED_TARGETS):
        instantiate(_plain(cfg.data), tokenizer=instantiate(_plain(cfg.tokenizer)))


def _context(cfg: DictConfig) -> int | None:
    """data.max_length, or None while it is not known: model=hf's context comes from the model's own config
    (${model.context_length} is null until train.py reads it)."""
    try:
        return cfg.data.get("max_length")
    except InterpolationValidationError:
        return None


def _plain(node: DictConfig) -> dict:
    """A group's values, resolved, on their own: instantiating the node itself would copy the whole config tree
    around it (Hydra keeps its interpolations' context), which the wizard, checking after every answer, feels."""
    return OmegaConf.to_container(node, resolve=True)


def _accumulation(cfg: DictConfig) -> None:
    accumulate = cfg.trainer.get("accumulate_grad_batches")
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate}: expected a whole number of micro-batches per optimizer "
            "step, 1 or more (the batch per step is data.batch_size x this x the devices)"
        )


def _device_precision(cfg: DictConfig) -> None:
    """bf16 on a CUDA GPU that lacks it (before Ampere): autocast would fail or emulate it slowly."""
    precision, accelerator = str(cfg.trainer.get("precision")), cfg.trainer.get("accelerator")
    if not precision.startswith("bf16") or accelerator not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
        return
    if not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"trainer.precision={precision}: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 support; "
            "use trainer.precision=16-mixed (or 32-true)"
        )


def _windows(cfg: DictConfig, token_counts: Mapping[str, int]) -> None:
    """The context against the data: each of train and validation must hold a window of context + 1 tokens,
    and the train split a micro-batch of windows for every device (TokenBlockDataset's own arithmetic)."""
    context, batch = _context(cfg), cfg.data.batch_size
    if context is None:
        return
    problems = []
    for split in ("train", "validation"):
        tokens = token_counts.get(split)
        if tokens is None:
            continue
        windows = len(TokenBlockDataset(range(tokens), context))  # only len() is read: no tokens needed
        if windows == 0:
            problems.append(
                f"the {split} split has {tokens:,} tokens, too few for one window of {context + 1} "
                f"(model.context_length + 1): lower model.context_length below {max(tokens - 1, 1)}, or add data"
                + (", or raise data.val_split" if split == "validation" else "")
            )
        elif split == "train":
            ranks = _ranks(cfg.trainer)
            if windows < batch * ranks:
                per = f" x {ranks} devices" if ranks > 1 else ""
                problems.append(
                    f"the train split makes {windows:,} windows of {context + 1} tokens, fewer than one batch of "
                    f"data.batch_size={batch}{per}: lower data.batch_size or model.context_length, or add data"
                )
    if problems:
        raise ConfigError("; ".join(problems))


def _ranks(trainer: DictConfig) -> int:
    """Processes the run will have, where the config says it plainly (an int or a list of devices)."""
    devices = trainer.get("devices")
    count = devices if isinstance(devices, int) and devices > 0 else 1
    if not isinstance(devices, int | str) and devices is not None:
        count = len(devices)
    return count * (trainer.get("num_nodes") or 1)
