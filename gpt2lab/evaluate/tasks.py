"""``gpt2lab evaluate ckpt=... tasks=[hellaswag,...]``: a checkpoint on lm-evaluation-harness tasks.

lm-eval's table is printed; the results go to ``eval.json`` in the run directory and to the loggers given
(``logger=wandb``: the checkpoint's own wandb run, at its step); a multirun gets ``optimized_metric``.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import execution_whitelist, instantiate
from omegaconf import DictConfig, OmegaConf

from gpt2lab.checkpoint import find_checkpoint, read_checkpoint
from gpt2lab.config import TRUSTED_TARGETS
from gpt2lab.errors import ConfigError
from gpt2lab.harness.tasks import (
    check_settings,
    flat_metrics,
    load_tasks,
    require_lm_eval,
    results_table,
    run_tasks,
)
from gpt2lab.lit.loggers import continue_wandb_run

log = logging.getLogger("gpt2lab.evaluate")
# The CSV logger writes into the Hydra run directory, which holds the log and .hydra/ already: nothing is deleted.
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")


def evaluate_tasks(cfg: DictConfig) -> dict[str, float]:
    """Run ``cfg.tasks`` on ``cfg.ckpt``; ``{"<task>/<metric>": value}``. Tasks and their data are loaded before
    the model, so that a task that cannot be had stops the command at once."""
    require_lm_eval()
    check_settings(cfg.limit, cfg.num_fewshot)
    import lm_eval

    from gpt2lab.harness.lm import DTYPES, GPT2LabLM

    if cfg.harness.dtype not in DTYPES:
        raise ConfigError(f"harness.dtype={cfg.harness.dtype}: expected one of {', '.join(DTYPES)}")
    if cfg.harness.batch_size < 1:
        raise ConfigError(f"harness.batch_size={cfg.harness.batch_size}: expected at least 1 request per forward pass")

    path = find_checkpoint(cfg.ckpt, cfg.paths.log_dir)
    names = OmegaConf.to_object(cfg.tasks) if OmegaConf.is_config(cfg.tasks) else cfg.tasks
    names = [names] if isinstance(names, str) else names
    tasks = load_tasks(names, cfg.harness.include_path)
    lm = GPT2LabLM(str(path), device=cfg.harness.device, batch_size=cfg.harness.batch_size, dtype=cfg.harness.dtype)
    log.info("Checkpoint: %s; tasks: %s", path, ", ".join(names))
    limit = int(cfg.limit) if cfg.limit is not None and cfg.limit >= 1 else cfg.limit
    results = run_tasks(lm, tasks, limit, cfg.num_fewshot)
    metrics = flat_metrics(results)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    kept = {
        "checkpoint": str(path),
        "tasks": names,
        "limit": limit,
        "num_fewshot": cfg.num_fewshot,
        "metrics": metrics,
        **{key: results.get(key) for key in ("results", "groups", "n-shot", "versions", "n-samples")},
        "lm_eval_version": lm_eval.__version__,
    }
    (output_dir / "eval.json").write_text(json.dumps(kept, indent=2, default=_plain))
    print(results_table(results))
    log.info("Saved %s", output_dir / "eval.json")
    _log_to_loggers(cfg, path, metrics)
    _check_objective(cfg, names, metrics)
    return metrics


def _log_to_loggers(cfg: DictConfig, checkpoint: Path, metrics: dict[str, float]) -> None:
    """The results in each logger of ``cfg.logger``, at the checkpoint's step; a wandb logger continues the run
    that wrote the checkpoint, so the numbers sit beside its curves."""
    if not cfg.get("logger"):
        return
    with execution_whitelist(TRUSTED_TARGETS):
        loggers = [instantiate(c) for c in cfg.logger.values() if c]
    continue_wandb_run(loggers, str(checkpoint))
    step = read_checkpoint(checkpoint).get("global_step", 0)
    for logger in loggers:
        logger.log_metrics({f"harness/{key}": value for key, value in metrics.items()}, step=step)
        logger.finalize("success")


def _check_objective(cfg: DictConfig, names: list[str], metrics: dict[str, float]) -> None:
    """A sweep needs a number: in a multirun, ``optimized_metric`` must be one of the results (eval.json is kept)."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and cfg.optimized_metric not in metrics:
        raise ConfigError(
            f"optimized_metric={cfg.optimized_metric}: not among the results of tasks=[{','.join(names)}]; "
            f"choose one of {', '.join(k for k in metrics if not k.endswith('_stderr'))}"
        )


def _plain(value: Any) -> Any:
    """numpy numbers and other values lm-eval's results hold, as JSON can keep them."""
    return value.item() if hasattr(value, "item") else str(value)
