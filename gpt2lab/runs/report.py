"""What ``gpt2lab runs`` reports: the selected runs as a table (aligned text or Markdown) or CSV, and their
validation curves drawn on request. A sweep's ``summary.csv`` / ``summary.md`` / ``curves.png`` are these tables
and this figure for the sweep directory (``gpt2lab.sweep.summary``)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gpt2lab.console import table
from gpt2lab.errors import ConfigError
from gpt2lab.runs.plots import plot_val_curves
from gpt2lab.runs.reading import COLUMNS, find_runs, select, varying_overrides

ERROR_WIDTH = 60  # characters of an error in the text table


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


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The rows as an aligned text table (or Markdown), with the overrides that differ between them and without
    the columns that are empty in every row; numbers to the right. The text table cuts errors short; the CSV has
    them whole."""
    shown = [{**r, "overrides": o} for r, o in zip(rows, varying_overrides(rows), strict=True)]
    columns = [c for c in COLUMNS if c in ("name", "status") or any(r.get(c) not in (None, "") for r in shown)]
    cells = [[_cell(r.get(c)) for c in columns] for r in shown]
    if "error" in columns and not markdown:
        i = columns.index("error")
        for row in cells:
            row[i] = row[i] if len(row[i]) <= ERROR_WIDTH else row[i][: ERROR_WIDTH - 3] + "..."
    numeric = [all(_is_number(r.get(c)) or r.get(c) is None for r in shown) for c in columns]
    return table(columns, cells, markdown=markdown, align=["right" if n else "left" for n in numeric])


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Every column, full overrides, values unrounded."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: r.get(c) for c in COLUMNS} for r in rows)
    return buffer.getvalue()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return "" if value is None else str(value)
