"""Loggers around a Hydra run: Weights & Biases through Lightning's ``WandbLogger``, and a resumed CSV log.

- ``wandb_logger`` (``conf/logger/wandb.yaml``'s ``_target_``): the run named, grouped and typed from the Hydra
  job (a multirun's jobs share a group, the sweep directory; each is named by its overrides), and online only
  when it can be: with no credentials or no route to the server it logs offline, says so, and ends by giving
  the ``wandb sync`` command. Checkpoints as artifacts (``log_model``) need an online run: refused at start.
- ``continue_wandb_run``: a run resumed from a checkpoint continues the wandb run of the checkpoint's run.
- ``keep_csv_history``: a run resumed in its own directory keeps its ``metrics.csv`` rows.
- ``finish_wandb_run``: every job ends its wandb run, failed or not. Without it the next job of a multirun
  would log into the previous job's run (``wandb.init`` returns the run in progress), and a job that raised
  would show as finished.
"""

from __future__ import annotations

import csv
import difflib
import logging
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from gpt2lab.errors import ConfigError
from gpt2lab.secrets import redact

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
WANDB_FIELDS = ("project", "entity", "group", "job_type", "tags", "name", "mode", "log_model", "id", "save_dir")
DEFAULT_BASE_URL = "https://api.wandb.ai"
# wandb names a run's directory <save_dir>/wandb/[offline-]run-<date>_<time>-<id>
RUN_DIR = re.compile(r"^(?:offline-)?run-\d{8}_\d{6}-(?P<id>[a-z0-9]+)$")


def wandb_logger(
    project: str = "gpt2lab",
    entity: str | None = None,
    group: str | None = None,
    job_type: str | None = None,
    tags: list[str] | tuple[str, ...] | str = (),
    name: str | None = None,
    mode: str | None = None,
    log_model: bool | str = False,
    id: str | None = None,
    save_dir: str = ".",
    **init_options: Any,
) -> WandbLogger:
    """A ``WandbLogger`` for this Hydra job; ``init_options`` go to ``wandb.init``. Every setting is checked
    here, at the start of the run: wandb itself would raise only at its first log, after the data is ready."""
    mode, chosen_by = _chosen_mode(mode)
    if log_model not in (True, False, "all"):
        raise ConfigError(f"logger.wandb.log_model={log_model!r}: expected true, false or all")
    _check_init_options(init_options)
    _check_with_wandb(project=project, run_id=id)
    why_offline = _why_offline() if mode in (None, "online") else None
    if why_offline and mode == "online":
        raise ConfigError(
            f"{chosen_by}, but {why_offline}. Log in (`wandb login`, or set WANDB_API_KEY), or log "
            "offline and upload later: logger.wandb.mode=offline"
        )
    if why_offline and rank_zero_only.rank == 0:
        log.warning(
            "wandb: %s, so this run logs offline; the end of the run prints the `wandb sync` command", why_offline
        )
    if why_offline:
        mode = "offline"
    if log_model and mode in ("offline", "disabled"):
        raise ConfigError(
            f"logger.wandb.log_model={log_model} uploads checkpoints as artifacts, which an {mode} run cannot do"
            + f" ({why_offline or chosen_by})"
            + ": set logger.wandb.log_model=false (the checkpoints stay in the run directory), or log in and go online"
        )
    job = _hydra_job()
    logger = WandbLogger(
        project=project,
        entity=entity,
        group=group or job.get("group"),
        job_type=job_type or job.get("job_type", "train"),
        tags=[tags] if isinstance(tags, str) else list(tags) or None,  # tags=baseline: one tag, not 8 letters
        name=name or job.get("name"),
        mode=mode or "online",
        log_model=log_model,
        id=id,
        save_dir=save_dir,
        **init_options,
    )
    if init_options.get("anonymous") is None:  # Lightning passes anonymous=None, which wandb>=0.19 warns about
        logger._wandb_init.pop("anonymous", None)
    return logger


def _chosen_mode(mode: str | None) -> tuple[str | None, str]:
    """The mode to log in and the setting that chose it (``logger.wandb.mode=offline``, for messages):
    ``logger.wandb.mode``, else a ``WANDB_MODE`` the user
    set (wandb's own names: dryrun is offline, run and shared are online), else None (online when possible).
    The mode is always passed to ``wandb.init`` explicitly, and an explicit mode overrides ``WANDB_MODE`` there,
    so the variable is read here."""
    if mode is not None:
        if mode not in MODES:
            raise ConfigError(
                f"logger.wandb.mode={mode!r}: expected one of {', '.join(MODES)}, or null (online when possible)"
            )
        return mode, f"logger.wandb.mode={mode}"
    env = os.environ.get("WANDB_MODE")
    if not env:
        return None, "logger.wandb.mode=null"
    chosen = {"dryrun": "offline", "run": "online", "shared": "online"}.get(env, env)
    if chosen not in MODES:
        raise ConfigError(
            f"WANDB_MODE={env!r}: expected one of {', '.join(MODES)}; unset it, or choose with logger.wandb.mode"
        )
    return chosen, f"WANDB_MODE={env}"


def _check_init_options(options: dict[str, Any]) -> None:
    """Keys added to ``logger.wandb`` (``+logger.wandb.notes=...``) must be arguments of ``wandb.init`` or of
    Lightning's ``WandbLogger`` that this file does not set already; wandb would raise a TypeError at its
    first log."""
    import inspect

    import wandb

    # Set from the fields above (dir, version and offline are WandbLogger's aliases of save_dir, id and mode)
    taken = {"entity", "project", "dir", "id", "version", "name", "tags", "group", "job_type", "mode", "offline"}
    taken |= {"resume", "experiment", "self", "kwargs"}
    extra = set(inspect.signature(wandb.init).parameters) | set(inspect.signature(WandbLogger.__init__).parameters)
    extra -= taken | set(WANDB_FIELDS)
    for key in options:
        if key in extra:
            continue
        instead = {
            "dir": "the directory is logger.wandb.save_dir (by default the run directory)",
            "version": "the run to continue is logger.wandb.id",
            "offline": "use logger.wandb.mode=offline",
            "resume": "a run resumed from a checkpoint continues its wandb run, and logger.wandb.id names another",
        }
        if key in instead:
            raise ConfigError(f"logger.wandb.{key}: gpt2lab sets it; {instead[key]}")
        close = difflib.get_close_matches(key, [*WANDB_FIELDS, *extra], n=1)
        raise ConfigError(
            f"logger.wandb.{key}: not a wandb setting{f' (did you mean {close[0]}?)' if close else ''}. Use a field "
            f"of conf/logger/wandb.yaml ({', '.join(WANDB_FIELDS)}) or add an argument of wandb.init: "
            f"+logger.wandb.<name>=..., with <name> one of {', '.join(sorted(extra))}"
        )


def _check_with_wandb(project: str | None, run_id: str | None) -> None:
    """wandb's own checks of the project name and run id (characters it refuses), now rather than at its
    first log."""
    import wandb

    for key, field, value in (("project", "project", project), ("id", "run_id", run_id)):
        try:
            wandb.Settings(**{field: value})
        except wandb.errors.UsageError as e:
            raise ConfigError(f"logger.wandb.{key}={value!r}: {e}. Choose another logger.wandb.{key}") from None


def continue_wandb_run(loggers: list[Logger], ckpt_path: str | None) -> None:
    """Give each wandb logger without an ``id`` the id of the run that wrote ``ckpt_path`` (found in that run's
    directory, ``<run>/checkpoints/<file>``), so that a resumed run continues its curves. Before the logger's
    first use, which is when ``wandb.init`` reads the id."""
    if not ckpt_path:
        return
    for logger in loggers:
        if not isinstance(logger, WandbLogger) or logger._id or logger._experiment is not None:
            continue
        runs = sorted(
            (d for d in (Path(ckpt_path).resolve().parent.parent / "wandb").glob("*run-*") if RUN_DIR.match(d.name)),
            key=lambda d: d.name.removeprefix("offline-"),
        )
        if not runs:
            log.info("wandb: %s has no wandb run beside it; this run starts a new one", ckpt_path)
            continue
        run_id = RUN_DIR.match(runs[-1].name)["id"]
        logger._wandb_init["id"] = logger._id = run_id  # what WandbLogger passes to wandb.init (resume="allow")
        log.info("wandb: continuing run %s of %s", run_id, runs[-1].parent.parent)


def keep_csv_history(loggers: list[Logger], ckpt_path: str | None) -> None:
    """A run resumed in its own directory (``ckpt_path=auto``, or its own last.ckpt) keeps the ``metrics.csv``
    rows logged before the checkpoint. Lightning's CSV logger deletes an existing file when it starts; the rows
    up to the checkpoint's step are read first and written back (the steps after it are trained again)."""
    if not ckpt_path:
        return
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if logger._experiment is not None or not path.is_file():
            continue
        if Path(ckpt_path).resolve().parent.parent != Path(logger.log_dir).resolve():
            continue  # resumed into a new directory: nothing to keep
        from gpt2lab.checkpoint import read_checkpoint

        step = read_checkpoint(ckpt_path)["global_step"]
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), [r for r in reader if r.get("step") and int(r["step"]) < step]
        writer = logger.experiment  # deletes the file
        writer.metrics_keys = sorted(header)
        with path.open("w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=writer.metrics_keys)
            out.writeheader()
            out.writerows(rows)
        log.info("metrics.csv: kept its %d rows before step %d", len(rows), step)


def finish_wandb_run(outcome: str, optuna_trial: int | None = None) -> None:
    """End the wandb run of this job, if it started one: ``outcome`` is finished, pruned or failed (a failed
    run ends with exit code 1, so wandb marks it failed). An Optuna trial records its number and state."""
    wandb = sys.modules.get("wandb")  # imported by WandbLogger only when a wandb logger is configured
    if wandb is None or wandb.run is None:
        return
    run = wandb.run
    if optuna_trial is not None:
        state = {"finished": "COMPLETE", "pruned": "PRUNED"}.get(outcome, "FAIL")
        run.summary.update({"optuna/trial": optuna_trial, "optuna/state": state})
    offline = run.settings.mode in ("offline", "dryrun")
    run_dir = Path(run.dir).parent
    wandb.finish(exit_code=1 if outcome == "failed" else 0)
    if offline:
        log.info("wandb: this run was logged offline; upload it with:  wandb sync %s", run_dir)


def _why_offline() -> str | None:
    """Why wandb cannot log online from here (None: it can)."""
    base_url = os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL)
    host = urlsplit(base_url).hostname or ""
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        return f"no wandb credentials (no WANDB_API_KEY, no {host} entry in ~/.netrc from `wandb login`)"
    from gpt2lab.hub import first_hop, reachable

    if not reachable(*first_hop(base_url)):
        return f"the wandb server at {base_url} is unreachable from this machine"
    return None


def _netrc_has(host: str) -> bool:
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _hydra_job() -> dict[str, str]:
    """The group, job type and name of this Hydra job: a multirun's jobs are grouped by their sweep directory,
    typed ``job`` (``trial`` under an Optuna sweeper) and named by their overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return {"job_type": "train"}
    sweep_dir = Path(hydra.sweep.dir)
    dated = re.fullmatch(r"\d{4}-\d{2}-\d{2}", sweep_dir.parent.name)  # multirun/<date>/<time>
    overrides = [o for o in hydra.overrides.task if not o.startswith("optuna_trial=")]
    swept = _swept_keys(hydra)
    varying = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept]
    return {
        "group": f"{sweep_dir.parent.name}_{sweep_dir.name}" if dated else sweep_dir.name,
        "job_type": "trial" if "optuna" in str(hydra.sweeper.get("_target_", "")).lower() else "job",
        "name": redact(",".join(varying or overrides)) or f"job {hydra.job.num}",
    }


def _swept_keys(hydra: Any) -> set[str]:
    """The keys a multirun varies: its sweeper's search space and the sweeps on its command line (``a=1,2``,
    ``range(...)``, ...), when this process has it (a job launched elsewhere may not: then none)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    keys = set((hydra.sweeper.get("params") or {}).keys())
    try:
        parsed = OverridesParser.create().parse_overrides(
            [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
        )
    except HydraException:
        return keys
    return keys | {o.key_or_group for o in parsed if o.is_sweep_override()}
