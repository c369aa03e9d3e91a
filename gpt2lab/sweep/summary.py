"""Multirun bookkeeping: a summary table and a figure of every job in a sweep, kept up to date as jobs finish.

``SweepSummary`` is a Hydra callback (``conf/hydra/default.yaml``). After each job it writes the job's outcome to
``<job>/job_summary.json`` and rebuilds ``summary.csv``, ``summary.md`` and ``curves.png`` (the jobs' validation
curves) in the sweep directory from all jobs, so they are there even when a job fails or the sweep is
interrupted; at the end of the multirun it prints the table. The rows, tables and figure are those of
``gpt2lab.runs`` (``gpt2lab runs <sweep dir>`` prints the same table). ``job_outcome`` decides each job's status
for this table and, in an Optuna sweep, the trial's state (``gpt2lab/sweep/optuna_sweeper.py``), so the two
always agree.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from gpt2lab.runs.plots import plot_val_curves
from gpt2lab.runs.reading import find_runs
from gpt2lab.runs.report import format_table, to_csv
from gpt2lab.secrets import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    status: str  # finished | failed | pruned
    objective: float | None  # set when finished
    error: str  # why the job failed or was pruned; empty when finished


def job_outcome(job_return: JobReturn, metric: str) -> JobOutcome:
    """What became of a job: finished with a finite objective (``metric``'s value, which the job returned),
    pruned by Optuna, or failed, with the error it raised or the objective it returned instead of a number (None
    when the run never measured ``metric``, NaN when training diverged)."""
    value = job_return._return_value
    if job_return.status == JobStatus.COMPLETED:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return JobOutcome("finished", float(value), "")
        return JobOutcome("failed", None, f"the objective ({metric}) is {value!r}, not a finite number")
    # Optuna's TrialPruned, known by name: this module is loaded by every multirun and does not import optuna.
    status = "pruned" if type(value).__name__ == "TrialPruned" else "failed"
    return JobOutcome(status, None, f"{type(value).__name__}: {value}")


class SweepSummary(Callback):
    def __init__(self) -> None:
        self._started = time.time()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or "optimized_metric" not in config:  # generate, chat: no objective
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        outcome = job_outcome(job_return, config.optimized_metric)
        summary = {
            "overrides": " ".join(redact(o) for o in job_return.overrides or []),
            "status": outcome.status,
            "objective": outcome.objective,
            "duration_s": round(time.time() - self._started, 1),
            "error": redact(outcome.error.splitlines()[0])[:300] if outcome.error else "",
        }
        _write_atomic(job_dir / "job_summary.json", json.dumps(summary, indent=2))
        write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        if rows:
            log.info("Sweep summary (%s):\n%s", sweep_dir / "summary.md", format_table(rows))


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rebuild ``summary.csv``, ``summary.md`` and ``curves.png`` from the sweep's jobs; returns the rows."""
    runs = find_runs(sweep_dir) if sweep_dir.is_dir() else []
    rows = [r.row for r in runs]
    if not rows:
        return rows
    _write_atomic(sweep_dir / "summary.csv", to_csv(rows))
    _write_atomic(sweep_dir / "summary.md", format_table(rows, markdown=True) + "\n")
    try:
        plot_val_curves(runs, sweep_dir / "curves.png")
    except Exception as e:  # a figure is not worth a sweep
        log.warning("No %s: %s", sweep_dir / "curves.png", e)
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
