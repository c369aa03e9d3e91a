"""Figures of several runs: their validation curves in one figure, each labelled with what differs between them
(``gpt2lab runs --plot``, a sweep's ``curves.png``). One run's own curves are ``gpt2lab.lit.curves``'s, drawn at
the end of training in the same style. matplotlib is imported only to draw."""

from __future__ import annotations

import textwrap
from pathlib import Path

from gpt2lab.lit.curves import new_figure, plain_style, save_figure
from gpt2lab.runs.reading import Run, varying_overrides

LEGEND_WIDTH = 130  # characters of a run's label in a figure's legend (7 pt, 8 inches wide)
LEGEND_LINE_HEIGHT = 0.16  # inches the figure grows by per run in its legend
COLOURS = tuple(f"C{i}" for i in range(10))  # matplotlib's default colour cycle (tab10)
DASHES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v")


def plot_val_curves(runs: list[Run], path: Path, metric: str = "val/loss") -> int:
    """The ``metric`` curves of several runs in one figure, each labelled with its name and the overrides that
    differ; returns how many runs had a curve (0: nothing written). The legend goes below the axes, one line per
    run, so that long labels (an Optuna study varies every key) leave the axes their size."""
    labels = varying_overrides([r.row for r in runs])
    curves = [(r, label) for r, label in zip(runs, labels, strict=True) if r.metrics.get(metric)]
    if not curves:
        return 0
    with plain_style():
        figure = new_figure(1, width=8, height=3.4 + LEGEND_LINE_HEIGHT * len(curves))
        ax = figure.axes[0]
        for i, (run, label) in enumerate(curves):
            steps, values = zip(*run.metrics[metric], strict=True)
            text = " ".join([run.name, *(_rounded(o) for o in label.split())])
            text = textwrap.shorten(text, LEGEND_WIDTH, placeholder=" ...")
            ax.plot(steps, values, markersize=3, label=text, **line_style(i))
        ax.set(xlabel="step", ylabel=metric)
        ax.grid(alpha=0.3)
        figure.legend(loc="outside lower center", fontsize=7, frameon=False, handlelength=3.5)
        save_figure(figure, path)
    return len(curves)


def line_style(i: int) -> dict[str, str]:
    """The ``i``-th run's colour, dash and marker: the colours go round first, then the dashes, then the markers.
    No two of the first 40 runs of a figure share colour and dash, nor two of the first 200 all three
    (matplotlib's cycle alone repeats its 10 colours from the 11th run on)."""
    colour, rest = i % len(COLOURS), i // len(COLOURS)
    dash, rest = rest % len(DASHES), rest // len(DASHES)
    return {"color": COLOURS[colour], "linestyle": DASHES[dash], "marker": MARKERS[rest % len(MARKERS)]}


def _rounded(override: str) -> str:
    """``optimizer.lr=0.000587194737873281`` as ``optimizer.lr=0.0005872``: a legend needs 4 digits, not 18."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.4g}" if len(value) > 8 and "." in value else override
