"""``python -m gpt2lab.runs outputs/`` (``gpt2lab runs``): the runs and multirun jobs under a directory as a table.

Everything is read from what a run leaves in its directory: ``results.json`` (written at the end of training),
``metrics.csv`` (the CSV logger), ``.hydra/overrides.yaml``, ``config.yaml``, ``checkpoints/``, ``train.log``,
``.run.lock`` and, for a multirun job, ``job_summary.json`` (``gpt2lab.sweep.summary``). A sweep's
``summary.csv`` / ``summary.md`` / ``curves.png`` are this module's rows, tables and figure for the sweep
directory. Fast: neither torch nor Lightning is imported, and matplotlib only to draw.

Status: ``finished`` (results.json), ``failed`` (an error was recorded, or the run ended before its first
checkpoint), ``pruned`` (Optuna stopped it), ``killed`` (checkpoints but no results.json: the process died),
``running`` (a live process holds its ``.run.lock``).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import itertools
import json
import logging
import math
import os
import re
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from gpt2lab.errors import ConfigError

log = logging.getLogger(__name__)
COLUMNS = (
    "name", "overrides", "status", "steps", "best_val_loss", "best_val_ppl", "tokens_per_s", "duration_s",
    "objective", "error",
)  # fmt: skip
# Files that only a training run writes: a directory holding one of them is a run.
RUN_MARKERS = ("results.json", "job_summary.json", "metrics.csv", "checkpoints", "config.yaml")
HIDDEN_OVERRIDES = ("optuna_trial",)  # the job's name says it already
ERROR_WIDTH = 60  # characters of an error in the text table
LOG_RECORD = re.compile(r"^\[\d{4}-\d{2}-\d{2} [\d:,]+\]\[")  # a record of Hydra's log format: [date time][logger]
LEGEND_WIDTH = 130  # characters of a run's label in a figure's legend (7 pt, 8 inches wide)
LEGEND_LINE_HEIGHT = 0.16  # inches the figure grows by per run in its legend


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
    def metrics(self) -> dict[str, list[tuple[int, float]]]:
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
    def row(self) -> dict[str, Any]:
        status, error = self._status()
        best = self.results.get("best_val_loss")
        if best is None:
            values = [v for _, v in self.metrics.get("val/loss", []) if math.isfinite(v)]
            best = min(values) if values else None
        steps = self.results.get("global_step")
        if steps is None and self.metrics.get("train/loss"):
            steps = max(s for s, _ in self.metrics["train/loss"]) + 1  # logged at step n after n + 1 steps
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
        error = _logged_error(self.path / "train.log")
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


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` of Lightning's CSV logger as ``{metric: [(step, value), ...]}``; empty if there is none."""
    series: dict[str, list[tuple[int, float]]] = {}
    try:
        with path.open(newline="") as f:
            for record in csv.DictReader(f):
                step = record.pop("step", "")
                record.pop("epoch", None)
                if not step:
                    continue
                for key, value in record.items():
                    if value:
                        try:
                            series.setdefault(key, []).append((int(float(step)), float(value)))
                        except ValueError:
                            continue
    except OSError:
        return {}
    return series


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


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The rows as an aligned text table (or Markdown), with the overrides that differ between them and without
    the columns that are empty in every row. The text table cuts errors short; the CSV has them whole."""
    shown = [{**r, "overrides": o} for r, o in zip(rows, varying_overrides(rows), strict=True)]
    columns = [c for c in COLUMNS if c in ("name", "status") or any(r.get(c) not in (None, "") for r in shown)]
    cells = [[_cell(r.get(c)) for c in columns] for r in shown]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells])
    if "error" in columns:
        i = columns.index("error")
        for row in cells:
            row[i] = row[i] if len(row[i]) <= ERROR_WIDTH else row[i][: ERROR_WIDTH - 3] + "..."
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(_is_number(r.get(c)) or r.get(c) is None for r in shown) for c in columns]

    def line(values: list[str]) -> str:
        padded = (v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), *(line(row) for row in cells)])


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Every column, full overrides, values unrounded."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r.get(c) for c in COLUMNS} for r in rows)
    return buffer.getvalue()


def plot_run_curves(metrics: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> bool:
    """One run's training and validation loss, validation bits per byte (where logged) and learning rate
    against steps, as a PNG. False, writing nothing, when no loss has been logged yet."""
    if not metrics.get("train/loss") and not metrics.get("val/loss"):
        return False
    panels = [("loss", ("train/loss", "val/loss"))]
    panels += [
        (name, (key,)) for name, key in (("bits per byte", "val/bpb"), ("learning rate", "lr")) if metrics.get(key)
    ]
    with _plain_style():
        figure = _figure(len(panels))
        for ax, (ylabel, keys) in zip(figure.axes, panels, strict=True):
            for key in keys:
                if metrics.get(key):
                    steps, values = zip(*metrics[key], strict=True)
                    ax.plot(steps, values, label=key, marker="o" if key.startswith("val/") else None, markersize=3)
            ax.set(xlabel="step", ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        if title:
            figure.suptitle(title, fontsize=10)
        _save(figure, path)
    return True


def plot_val_curves(runs: list[Run], path: Path, metric: str = "val/loss") -> int:
    """The ``metric`` curves of several runs in one figure, each labelled with its name and the overrides that
    differ; returns how many runs had a curve (0: nothing written). The legend goes below the axes, one line per
    run, so that long labels (an Optuna study varies every key) leave the axes their size."""
    labels = varying_overrides([r.row for r in runs])
    curves = [(r, label) for r, label in zip(runs, labels, strict=True) if r.metrics.get(metric)]
    if not curves:
        return 0
    with _plain_style():
        figure = _figure(1, width=8, height=3.4 + LEGEND_LINE_HEIGHT * len(curves))
        ax = figure.axes[0]
        for run, label in curves:
            steps, values = zip(*run.metrics[metric], strict=True)
            text = " ".join([run.name, *(_rounded(o) for o in label.split())])
            text = textwrap.shorten(text, LEGEND_WIDTH, placeholder=" ...")
            ax.plot(steps, values, marker="o", markersize=3, label=text)
        ax.set(xlabel="step", ylabel=metric)
        ax.grid(alpha=0.3)
        figure.legend(loc="outside lower center", fontsize=7, frameon=False)
        _save(figure, path)
    return len(curves)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="gpt2lab runs",
        description="A table of the training runs and multirun jobs under a directory (also python -m gpt2lab.runs).",
    )
    parser.add_argument("directory", nargs="?", default="outputs", help="where the runs are (default: outputs)")
    parser.add_argument("--sort", metavar="KEY", help=f"a column ({', '.join(COLUMNS)}) or a config key")
    parser.add_argument("--reverse", action="store_true", help="sort in descending order")
    parser.add_argument(
        "--filter", metavar="KEY=VALUE", action="append", default=[],
        help="keep runs whose column, override or config key has this value (* globs); repeatable",
    )  # fmt: skip
    parser.add_argument("--csv", action="store_true", help="print CSV (every column, full overrides)")
    parser.add_argument("--plot", metavar="FILE", help="draw the selected runs' validation curves into FILE (.png)")
    args = parser.parse_args(argv)
    try:
        rows, written = run_table(args.directory, args.filter, args.sort, args.reverse, args.plot)
    except ConfigError as e:
        parser.exit(1, f"Error: {e}\n")
    try:
        print(to_csv(rows) if args.csv else format_table(rows), end="\n" if not args.csv else "", flush=True)
    except BrokenPipeError:  # gpt2lab runs | head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        return
    if args.plot:
        print(f"Validation curves of {written} run(s): {args.plot}", file=sys.stderr)


def run_table(
    directory: str | Path,
    filters: Iterable[str] = (),
    sort: str | None = None,
    reverse: bool = False,
    plot: str | Path | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """What ``gpt2lab runs`` prints: the selected rows, and how many curves went into ``plot``."""
    root = Path(directory)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise ConfigError(
            f"{directory} {what}. Give the directory the runs are under (paths.log_dir, by default outputs)"
        )
    runs = find_runs(root)
    if not runs:
        raise ConfigError(
            f"no runs under {directory} (a run directory holds results.json, metrics.csv or checkpoints/). "
            "Train one with python train.py, or give the directory the runs went to (paths.log_dir)"
        )
    selected = select(runs, filters, sort, reverse)
    if not selected:
        raise ConfigError(f"none of the {len(runs)} runs under {directory} matches --filter {' '.join(filters)}")
    written = 0
    if plot:
        plot = Path(plot)
        if not plot.parent.is_dir():
            raise ConfigError(f"--plot {plot}: the directory {plot.parent} does not exist")
        try:
            written = plot_val_curves(selected, plot)
        except (ValueError, OSError) as e:  # an unknown image format, an unwritable file
            raise ConfigError(f"--plot {plot}: {e}. Give a writable .png, .pdf or .svg file") from None
        if not written:
            raise ConfigError(f"--plot {plot}: none of the selected runs has logged val/loss yet (metrics.csv)")
    return [r.row for r in selected], written


def _is_run(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def _is_live(path: Path) -> bool:
    """Whether a live process holds the run's ``.run.lock`` (``gpt2lab.run_dir``)."""
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


def _logged_error(train_log: Path) -> str:
    """The last ERROR record of a run's log (``gpt2lab.errors.report_errors`` logs the user's error there). An
    exception that escaped the job is Hydra's ``Job failed`` record with the traceback under it: then the
    traceback's last line, which names the exception."""
    try:
        lines = train_log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
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


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return "" if value is None else str(value)


def _rounded(override: str) -> str:
    """``optimizer.lr=0.000587194737873281`` as ``optimizer.lr=0.0005872``: a legend needs 4 digits, not 18."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.4g}" if len(value) > 8 and "." in value else override


def _plain_style() -> Any:
    """Matplotlib's default style while drawing: a sweep's process may have set another globally (Optuna's
    plots set ggplot)."""
    import matplotlib.style

    return matplotlib.style.context("default")


def _figure(panels: int, width: float = 4.5, height: float = 3.4) -> Any:
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    figure = Figure(figsize=(width * panels if panels > 1 else width, height), layout="constrained")
    figure.subplots(1, panels, squeeze=False)
    return figure


def _save(figure: Any, path: Path) -> None:
    """Rename into place: a sweep's jobs may redraw the same figure at the same time (joblib launcher)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
