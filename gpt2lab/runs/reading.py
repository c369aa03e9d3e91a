"""Runs on disk, read: every run directory under a directory, each run's status, numbers, overrides and config, and
the runs that match filters, sorted.

Everything is read from what a run leaves in its directory: ``results.json`` (written at the end of training),
``metrics.csv`` (the CSV logger), ``.hydra/overrides.yaml``, ``config.yaml``, ``checkpoints/``, ``train.log``,
``.run.lock`` and, for a multirun job, ``job_summary.json`` (``gpt2lab.sweep.summary``). Fast: neither torch nor
Lightning is imported.

Status: ``finished`` (results.json), ``stopped`` (a signal stopped it cleanly: Ctrl-C, SIGTERM or SLURM's warning,
the last thing its train.log says), ``failed`` (an error was recorded, or the run ended before its first
checkpoint), ``pruned`` (Optuna stopped it), ``killed`` (checkpoints but no results.json and no word of a stop:
the process died), ``running`` (a live process holds its ``.run.lock``).
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from gpt2lab.errors import ConfigError
from gpt2lab.lit.curves import Series, read_metrics

COLUMNS = (
    "name", "overrides", "status", "steps", "best_val_loss", "best_val_ppl", "tokens_per_s", "duration_s",
    "objective", "error",
)  # fmt: skip
# Files that only a training run writes: a directory holding one of them is a run.
RUN_MARKERS = ("results.json", "job_summary.json", "metrics.csv", "checkpoints", "config.yaml")
HIDDEN_OVERRIDES = ("optuna_trial",)  # the job's name says it already
LOG_RECORD = re.compile(r"^\[\d{4}-\d{2}-\d{2} [\d:,]+\]\[")  # a record of Hydra's log format: [date time][logger]
# What gpt2lab.train logs when a signal stopped the run at a step boundary (gpt2lab.train.run._stopped_by_signal),
# and what may follow it in the same stop (SLURM's requeue).
STOP_RECORD = re.compile(r"\]\[WARNING\] - Stopped by SIG\w+ at step \d+")
AFTER_STOP = re.compile(r"\]\[WARNING\] - Requeued SLURM job ")


@dataclass
class Run:
    """One run directory, read lazily: ``row`` is its line in the table."""

    path: Path
    name: str

    def _json(self, filename: str) -> dict[str, Any]:
        path = self.path / filename
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}

    @cached_property
    def results(self) -> dict[str, Any]:
        return self._json("results.json")

    @cached_property
    def job_summary(self) -> dict[str, Any]:
        return self._json("job_summary.json")

    @cached_property
    def metrics(self) -> Series:
        return read_metrics(self.path / "metrics.csv")

    @cached_property
    def config(self) -> dict[str, Any]:
        """The resolved config the run wrote (``config.yaml``), or Hydra's composed one."""
        for path in (self.path / "config.yaml", self.path / ".hydra" / "config.yaml"):
            if path.is_file():
                try:
                    return yaml.safe_load(path.read_text()) or {}
                except (OSError, yaml.YAMLError):
                    pass
        return {}

    @cached_property
    def overrides(self) -> list[str]:
        if "overrides" in self.job_summary:
            return self.job_summary["overrides"].split()
        path = self.path / ".hydra" / "overrides.yaml"
        try:
            return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.is_file() else []
        except (OSError, yaml.YAMLError):
            return []

    @cached_property
    def log_lines(self) -> list[str]:
        """The lines of the run's ``train.log`` (empty if it has none)."""
        try:
            return (self.path / "train.log").read_text(errors="replace").splitlines()
        except OSError:
            return []

    @cached_property
    def row(self) -> dict[str, Any]:
        status, error = self._status()
        best = self.results.get("best_val_loss")
        if best is None:
            values = [v for _, v in self.metrics.get("val/loss", []) if math.isfinite(v)]
            best = min(values) if values else None
        steps = self.results.get("global_step")
        if steps is None and self.metrics.get("train/loss"):
            steps = max(s for s, _ in self.metrics["train/loss"])  # logged at the number of steps done
        objective = self.job_summary.get("objective")
        if objective is None and status == "finished":
            objective = self.results.get("metrics", {}).get(self.config.get("optimized_metric", "val/loss"))
        duration = self.job_summary.get("duration_s", self.results.get("duration_s"))
        return {
            "name": self.name,
            "overrides": " ".join(self.overrides),
            "status": status,
            "steps": steps,
            "best_val_loss": best,
            "best_val_ppl": math.exp(best) if best is not None and best < 700 else None,
            "tokens_per_s": self.results.get("tokens_per_sec"),
            "duration_s": duration if duration is not None else self._duration(),
            "objective": objective,
            "error": error,
        }

    def _status(self) -> tuple[str, str]:
        if "status" in self.job_summary:  # a multirun job: the sweep decided, with its error
            return self.job_summary["status"], self.job_summary.get("error", "")
        if self.results:
            return "finished", ""
        if _is_live(self.path):
            return "running", ""
        if _stopped(self.log_lines):  # before the errors: a run resumed after a failure may then be stopped
            return "stopped", ""
        error = _logged_error(self.log_lines)
        if error:
            return "failed", error
        if any((self.path / "checkpoints").glob("*.ckpt")):
            return "killed", ""
        return "failed", "ended before its first checkpoint, with no error in train.log"

    def _duration(self) -> float | None:
        """For a run that never wrote results.json: from its start (Hydra's .hydra/) to its last metrics."""
        start = self.path / ".hydra" / "config.yaml"
        end = self.path / "metrics.csv"
        if start.is_file() and end.is_file():
            return round(max(0.0, end.stat().st_mtime - start.stat().st_mtime), 1)
        return None

    def value(self, key: str) -> Any:
        """A column, else an override of this run, else a key of its resolved config (``model.num_layers``);
        ``KeyError`` if the run has none of these."""
        if key in COLUMNS:
            return self.row[key]
        for override in self.overrides:
            name, _, value = override.partition("=")
            if name.lstrip("+~") == key:
                return value
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(key)
            node = node[part]
        return node


def find_runs(root: Path) -> list[Run]:
    """Every run directory under ``root`` (``root`` itself if it is one), in natural order of their paths."""
    root = Path(root)
    if _is_run(root):
        return [Run(root, root.resolve().name)]
    runs = []
    for directory, subdirs, _ in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        path = Path(directory)
        if path != root and _is_run(path):
            runs.append(Run(path, path.relative_to(root).as_posix()))
            subdirs[:] = []  # checkpoints/, tensorboard/: a run holds no other run
    return sorted(runs, key=lambda r: _natural(r.name))


def select(runs: list[Run], filters: Iterable[str] = (), sort: str | None = None, reverse: bool = False) -> list[Run]:
    """The runs that match every ``key=value`` filter (a column, an override or a config key; ``*`` globs;
    numbers compare as numbers), sorted by ``sort`` (missing values last)."""
    for spec in filters:
        key, sep, wanted = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--filter {spec!r}: expected key=value, e.g. --filter status=finished or --filter model.num_layers=4"
            )
        _check_key(runs, key, "--filter")
        runs = [r for r in runs if _matches(r, key, wanted)]
    if sort:
        _check_key(runs, sort, "--sort")
        present = [r for r in runs if _has(r, sort) and r.value(sort) is not None]
        missing = [r for r in runs if r not in present]
        runs = sorted(present, key=lambda r: _sort_key(r.value(sort)), reverse=reverse) + missing
    return runs


def varying_overrides(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's overrides, keeping only those that differ between the rows: the rest is the same for all."""
    split = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    varying = {k for d in split for k in d if k not in HIDDEN_OVERRIDES and len({d2.get(k) for d2 in split}) > 1}
    return [" ".join(f"{k}={v}" for k, v in d.items() if k in varying) for d in split]


def _is_run(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def _is_live(path: Path) -> bool:
    """Whether a live process holds the run's ``.run.lock`` (``gpt2lab.cli.run_dir``)."""
    lock_file = path / ".run.lock"
    if not lock_file.is_file():
        return False
    from filelock import FileLock, Timeout

    lock = FileLock(lock_file, blocking=False)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:  # a read-only directory: nobody can be writing there
        return False
    lock.release()
    return False


def _stopped(lines: list[str]) -> bool:
    """Whether the last thing a run's log records is a clean stop by a signal: ``Stopped by SIGINT at step N``
    (Ctrl-C, SIGTERM, SLURM's warning signal), followed by nothing but its requeue. A log goes on when the run is
    resumed in the same directory, so an earlier stop followed by more training is not one."""
    records = [line for line in lines if LOG_RECORD.match(line)]
    last_stop = max((i for i, line in enumerate(records) if STOP_RECORD.search(line)), default=None)
    return last_stop is not None and all(AFTER_STOP.search(line) for line in records[last_stop + 1 :])


def _logged_error(lines: list[str]) -> str:
    """The last ERROR record of a run's log lines (``gpt2lab.errors.report_errors`` logs the user's error there).
    An exception that escaped the job is Hydra's ``Job failed`` record with the traceback under it: then the
    traceback's last line, which names the exception."""
    error = ""
    for i, line in enumerate(lines):
        if "][ERROR] - " not in line:
            continue
        error = line.split("] - ", 1)[-1]
        below = itertools.takewhile(lambda text: not LOG_RECORD.match(text), lines[i + 1 :])
        unindented = [text for text in below if text.strip() and not text[0].isspace()]
        if unindented and unindented[0].startswith("Traceback") and len(unindented) > 1:
            error = unindented[-1]
    return error[:300]


def _check_key(runs: list[Run], key: str, option: str) -> None:
    if key not in COLUMNS and not any(_has(r, key) for r in runs):
        raise ConfigError(
            f"{option} {key}: no run has this key. Use a column ({', '.join(COLUMNS)}), an override or a "
            "config key such as model.num_layers or optimizer.lr"
        )


def _has(run: Run, key: str) -> bool:
    try:
        run.value(key)
    except KeyError:
        return False
    return True


def _matches(run: Run, key: str, wanted: str) -> bool:
    try:
        actual = run.value(key)
    except KeyError:
        return False
    try:
        return math.isclose(float(actual), float(wanted), rel_tol=1e-9)
    except (TypeError, ValueError):
        return fnmatch.fnmatchcase("" if actual is None else str(actual), wanted)


def _sort_key(value: Any) -> tuple[int, Any]:
    try:
        return (0, float(value))
    except (TypeError, ValueError):
        return (1, _natural(str(value)))


def _natural(text: str) -> list[Any]:
    """``2`` before ``10``: digits compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]
