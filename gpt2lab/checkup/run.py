"""A model's check-up before training, as a function of ``conf/check.yaml`` (``python -m gpt2lab.check [model=... |
ckpt=...] [tier=1|2|3]`` is its command).

Builds the model ``model=...`` describes (or loads ``ckpt=...``), runs tiers 1..``tier`` of
``gpt2lab/checkup/``, prints a pass/warn/fail table per tier and writes ``check.md``, ``check.json`` and the
figures to the run directory. A failed check ends the command with an ``Error:`` line that names it. See
docs/checkup.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import execution_whitelist, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from tokenizers import Tokenizer

from gpt2lab.checkpoint import find_checkpoint, load_checkpoint
from gpt2lab.checkup import TIERS, CheckConfig, CheckResult, failed, format_table, run_all_tests, write_reports
from gpt2lab.config import TRUSTED_TARGETS, ModelBaseSchema, PathsSchema
from gpt2lab.errors import ConfigError
from gpt2lab.lit.cpu_threads import use_free_cores
from gpt2lab.model import GPT2Model
from gpt2lab.model.adapter import CausalLM, is_gpt2
from gpt2lab.model.adapter import build_model as build_model_from_config

log = logging.getLogger("gpt2lab.check")


@dataclasses.dataclass
class CheckSchema:
    model: ModelBaseSchema = MISSING  # typed by the chosen option's schema, as for train.py
    paths: PathsSchema = dataclasses.field(default_factory=PathsSchema)
    ckpt: Optional[str] = None  # noqa: UP045 (OmegaConf needs Optional) - a checkpoint instead of model
    tier: int = 1
    device: str = "auto"
    check: CheckConfig = dataclasses.field(default_factory=CheckConfig)
    task_name: str = "check"


def register_check_schema() -> None:
    """``conf/check.yaml``'s schema (``check_schema`` in its defaults), for the command and for composing it."""
    ConfigStore.instance().store(name="check_schema", node=CheckSchema, replace=True)


GPT2_VOCAB = 50257  # conf/model/gpt2*.yaml leave vocab_size to the tokenizer; the check builds none


class CheckFailed(ConfigError):
    """A check failed: the model, not the command, is at fault; the message names the checks."""


def build_model(cfg: DictConfig, device: str) -> tuple[GPT2Model | CausalLM, Tokenizer | None, dict[str, Any]]:
    """The model to check: ``ckpt``'s if given, else a fresh one from ``model`` (gpt2lab's GPT-2, or the
    ``CausalLM`` of ``model=hf`` / ``model=module``, built as training builds it); and a description of it."""
    if cfg.ckpt:
        path = find_checkpoint(cfg.ckpt, cfg.paths.log_dir)
        model, tokenizer = load_checkpoint(path, device=device)
        log.info("Checking the checkpoint %s (its own model: the model group is not used)", path)
        return model, tokenizer, {"checkpoint": str(path), "config": _described(model)}
    choice = HydraConfig.get().runtime.choices.get("model") if HydraConfig.initialized() else None
    torch.manual_seed(cfg.check.seed)
    if is_gpt2(cfg.model):
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = GPT2_VOCAB
            log.info("model.vocab_size: GPT-2's %d (the default run's BPE has 1024: model.vocab_size=1024)", GPT2_VOCAB)
        with execution_whitelist(TRUSTED_TARGETS), torch.device(device):
            model = GPT2Model(instantiate(cfg.model, _convert_="all"))
    else:
        model = build_model_from_config(cfg.model).to(device)
    return model, None, {"model": choice or "from config", "config": _described(model)}


def _described(model: GPT2Model | CausalLM) -> dict[str, Any]:
    if isinstance(model, GPT2Model):
        return dataclasses.asdict(model.config)
    return OmegaConf.to_container(model.config, resolve=True)


def choose_device(device: str) -> str:
    """``device=auto`` is the GPU if there is one; a named device must exist here."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ConfigError(f"device={device!r}: not a device; use auto, cpu, cuda or cuda:<n>") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: this machine has no CUDA GPU; use device=cpu (or auto)")
    return device


def check(cfg: DictConfig) -> list[CheckResult]:
    """Run the check-up ``conf/check.yaml`` describes; the results, also written to the run directory."""
    if cfg.tier not in TIERS:
        raise ConfigError(f"tier={cfg.tier}: expected 1, 2 or 3 (tier N runs tiers 1 to N)")
    config = CheckConfig(**OmegaConf.to_container(cfg.check, resolve=True))
    device = choose_device(cfg.device)
    # On a CPU, the cores other processes leave free, for the check-up only (the count is restored after it)
    with use_free_cores() if device == "cpu" else contextlib.nullcontext():
        model, tokenizer, about = build_model(cfg, device)
        if config.prompt and tokenizer is None:
            log.warning("check.prompt: ignored, a model built from config has no tokenizer (random tokens are used)")
        # Pretrained weights (model=hf's default) are not at initialisation either: no init expectations for them
        trained = bool(cfg.ckpt) or (not is_gpt2(cfg.model) and bool(cfg.model.get("pretrained")))
        about |= {"parameters": f"{model.num_parameters():,}", "device": device, "tier": cfg.tier}
        log.info("Model: %s parameters on %s; tiers 1 to %d", about["parameters"], device, cfg.tier)
        output_dir = Path(cfg.paths.output_dir)
        results = run_all_tests(
            model, config, tier=cfg.tier, trained=trained, tokenizer=tokenizer, output_dir=output_dir
        )
        print(format_table(results), flush=True)
        reports = write_reports(results, output_dir, about)
        log.info("Reports: %s", ", ".join(str(p) for p in reports))
        if failed(results):
            raise CheckFailed(f"failed checks: {', '.join(failed(results))} (details in {reports[0]})")
        return results
