"""Multirun bookkeeping: a summary table of every job in a sweep, kept up to date as jobs finish.

``SweepSummary`` is a Hydra callback (``conf/hydra/default.yaml``). After each job it writes the job's
row to ``<job>/job_summary.json`` and rebuilds ``summary.csv`` and ``summary.md`` in the sweep directory
from all rows, so the table is there even when a job fails or the sweep is interrupted; at the end of the
multirun it prints the table. ``job_outcome`` decides each job's status for this table and, in an Optuna
sweep, the trial's state (``gpt2lab/hpo.py``), so the two always agree.
"""

from __future__ import annotations

import csv
import io
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

log = logging.getLogger(__name__)
COLUMNS = ("job", "overrides", "status", "objective", "best_val_loss", "duration_s", "error")


@dataclass(frozen=True)
class JobOutcome:
    status: str  # completed | failed | pruned
    objective: float | None  # set when completed
    error: str  # why the job failed or was pruned; empty when completed


def job_outcome(job_return: JobReturn, metric: str) -> JobOutcome:
    """What became of a job: completed with a finite objective (``metric``'s value, which the job returned),
    pruned by Optuna, or failed, with the error it raised or the objective it returned instead of a number (None
    when the run never measured ``metric``, NaN when training diverged)."""
    value = job_return._return_value
    if job_return.status == JobStatus.COMPLETED:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return JobOutcome("completed", float(value), "")
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
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        results_file = job_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        outcome = job_outcome(job_return, config.optimized_metric)
        row = {
            "job": job_dir.name,  # the job number, or trial_<n> in an Optuna sweep
            "overrides": " ".join(job_return.overrides or []),
            "status": outcome.status,
            "objective": outcome.objective,
            "best_val_loss": results.get("best_val_loss"),
            "duration_s": round(time.time() - self._started, 1),
            "error": outcome.error.splitlines()[0][:300] if outcome.error else "",
        }
        _write_atomic(job_dir / "job_summary.json", json.dumps(row, indent=2))
        write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        if rows:
            log.info("Sweep summary (%s):\n%s", sweep_dir / "summary.md", markdown_table(rows))


def collect_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(p.read_text()) for p in sweep_dir.glob("*/job_summary.json")]
    return sorted(rows, key=lambda r: (len(str(r["job"])), str(r["job"])))  # 2 before 10


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value).replace("|", "\\|")

    # Show only the overrides that differ between jobs: the rest is the same for every row.
    split = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    varying = {k for d in split for k in d if len({d2.get(k) for d2 in split}) > 1}
    shown = [
        {**r, "overrides": " ".join(f"{k}={v}" for k, v in d.items() if k in varying)}
        for r, d in zip(rows, split, strict=True)
    ]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in shown]
    return "\n".join(lines)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rebuild ``summary.csv`` and ``summary.md`` from the jobs' rows; returns the rows."""
    rows = collect_rows(sweep_dir)
    if not rows:
        return rows
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({c: r.get(c) for c in COLUMNS} for r in rows)
    _write_atomic(sweep_dir / "summary.csv", buffer.getvalue())
    _write_atomic(sweep_dir / "summary.md", markdown_table(rows) + "\n")
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
