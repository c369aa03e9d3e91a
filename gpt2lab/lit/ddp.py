"""Hydra + Lightning DDP: the command each extra rank runs.

Lightning's DDP launcher starts ranks 1..N-1 by re-running ``sys.argv`` with ``hydra.run.dir`` set to
the *run* directory. Inside a multirun that is wrong twice over: ``sys.argv`` still holds ``-m`` and the
sweep lists, so every rank would launch a nested sweep, and the run directory is not the job's. Here
each rank re-runs only this job's own overrides, in RUN mode, in this job's directory (with Hydra's
``.hydra/`` output switched off, so only rank 0 writes the job's config).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from hydra.core.hydra_config import HydraConfig

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
