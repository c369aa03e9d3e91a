"""A run's curves: ``metrics.csv`` (Lightning's CSV logger) read back as series, and the figure of one run's loss,
bits per byte and learning rate against steps.

The ``Curves`` callback draws it at the end of training; ``gpt2lab runs`` reads the same series and draws its
figures with the same style, figure and atomic save (``plain_style``, ``new_figure``, ``save_figure``). Neither
torch nor Lightning is imported here, and matplotlib only to draw.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

Series = dict[str, list[tuple[int, float]]]  # {metric: [(step, value), ...]}


def read_metrics(path: Path) -> Series:
    """``metrics.csv`` of Lightning's CSV logger as ``{metric: [(step, value), ...]}``; empty if there is none."""
    series: Series = {}
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


def plot_run_curves(metrics: Series, path: Path, title: str = "") -> bool:
    """One run's training and validation loss, validation bits per byte (where logged) and learning rate
    against steps, as a PNG. False, writing nothing, when no loss has been logged yet."""
    if not metrics.get("train/loss") and not metrics.get("val/loss"):
        return False
    panels = [("loss", ("train/loss", "val/loss"))]
    panels += [
        (name, (key,)) for name, key in (("bits per byte", "val/bpb"), ("learning rate", "lr")) if metrics.get(key)
    ]
    with plain_style():
        figure = new_figure(len(panels))
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
        save_figure(figure, path)
    return True


def plain_style() -> Any:
    """Matplotlib's default style while drawing: a sweep's process may have set another globally (Optuna's
    plots set ggplot)."""
    import matplotlib.style

    return matplotlib.style.context("default")


def new_figure(panels: int, width: float = 4.5, height: float = 3.4) -> Any:
    """A figure of ``panels`` axes side by side, each ``width`` x ``height`` inches."""
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state

    figure = Figure(figsize=(width * panels if panels > 1 else width, height), layout="constrained")
    figure.subplots(1, panels, squeeze=False)
    return figure


def save_figure(figure: Any, path: Path) -> None:
    """Rename into place: a sweep's jobs may redraw the same figure at the same time (joblib launcher)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
