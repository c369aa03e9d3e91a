"""Hydra + Lightning DDP: one run directory for all the ranks of a job, whoever starts them.

Lightning's DDP launcher starts ranks 1..N-1 by re-running ``sys.argv`` with ``hydra.run.dir`` set to
the *run* directory. Inside a multirun that is wrong twice over: ``sys.argv`` still holds ``-m`` and the
sweep lists, so every rank would launch a nested sweep, and the run directory is not the job's. Here
each rank re-runs only this job's own overrides, in RUN mode, in this job's directory (with Hydra's
``.hydra/`` output switched off, so only rank 0 writes the job's config).

When ``torchrun`` or ``srun`` starts the ranks (several machines), Lightning starts none and every rank
runs Hydra itself. ``ExternalRanks`` (a Hydra callback, ``conf/hydra/default.yaml``) gives those ranks
the same treatment, and stops a run whose directory would differ between ranks.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from gpt2lab.errors import refuse

# Command-line flags that select the config rather than override it; kept for the ranks.
CONFIG_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def hydra_job_command(local_rank: int) -> tuple[Sequence[str], str]:
    """``(command, cwd)`` for rank ``local_rank`` of the current Hydra job."""
    import __main__

    hydra_cfg = HydraConfig.get()
    cwd = hydra_cfg.runtime.cwd
    if __main__.__spec__ is None:
        command = [sys.executable, os.path.join(cwd, sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg in CONFIG_FLAGS and i + 1 < len(args):
            command += [arg, args[i + 1]]
        elif arg.startswith(tuple(f"{flag}=" for flag in CONFIG_FLAGS)):
            command.append(arg)
    command += list(hydra_cfg.overrides.task)
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name={hydra_cfg.job.name}_ddp_rank_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, cwd


def use_job_command_for_ddp() -> None:
    """Point Lightning's DDP launcher at ``hydra_job_command`` (idempotent)."""
    import lightning_fabric.strategies.launchers.subprocess_script as fabric_launcher
    import pytorch_lightning.strategies.launchers.subprocess_script as pl_launcher

    fabric_launcher._hydra_subprocess_cmd = hydra_job_command
    pl_launcher._hydra_subprocess_cmd = hydra_job_command


def external_rank() -> tuple[int, int] | None:
    """``(global rank, world size)`` when ``torchrun`` or ``srun`` started this process (then Lightning's
    ``TorchElasticEnvironment`` or ``SLURMEnvironment`` applies and it starts no processes), else None."""
    if TorchElasticEnvironment.detect():
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if SLURMEnvironment.detect():
        return int(os.environ.get("SLURM_PROCID", 0)), int(os.environ["SLURM_NTASKS"])
    return None


class ExternalRanks(Callback):
    """Every rank that ``torchrun`` or ``srun`` starts composes the config and sets up its run directory
    itself. Rank 0 keeps the run's ``.hydra/`` and ``train.log``; rank ``r`` > 0 writes no ``.hydra/`` and
    logs to ``train_ddp_rank_<r>.log``, as the ranks Lightning starts do. A run directory that contains
    ``${now:...}`` would differ between ranks started a second apart, so it is refused."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        launched = external_rank()
        if launched is None or launched[1] == 1:
            return
        rank, world_size = launched
        run_dir = OmegaConf.to_container(config.hydra.run, resolve=False)["dir"]
        if "${now:" in run_dir:
            refuse(
                f"hydra.run.dir={run_dir} resolves separately on each of the {world_size} ranks that torchrun/srun "
                "started, giving each its own directory. Name one directory for the whole run: "
                "hydra.run.dir=outputs/<name>"
            )
        if rank != 0:
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None
                config.hydra.job.name = f"{config.hydra.job.name}_ddp_rank_{rank}"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launched = external_rank()
        if launched is not None and launched[1] > 1:
            refuse(
                f"a multirun (-m) under torchrun/srun would run the whole sweep on each of the {launched[1]} ranks. "
                "Start the sweep from one process; hydra/launcher=submitit_slurm starts each job's ranks"
            )

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A multi-task SLURM job of a sweep (``hydra/launcher=submitit_slurm``, ``tasks_per_node`` > 1):
        each task runs the job; Hydra has set up the job's log already, so move rank ``r`` > 0 to its own."""
        launched = external_rank()
        if config.hydra.mode != RunMode.MULTIRUN or launched is None or launched[0] == 0:
            return
        job_log = Path(config.hydra.runtime.output_dir, f"{config.hydra.job.name}.log")
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == job_log:
                rank_log = logging.FileHandler(job_log.with_name(f"{job_log.stem}_ddp_rank_{launched[0]}.log"))
                rank_log.setFormatter(handler.formatter)
                rank_log.setLevel(handler.level)
                root.removeHandler(handler)
                handler.close()
                root.addHandler(rank_log)
