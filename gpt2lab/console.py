"""What gpt2lab prints for people: tables (rendered by ``rich``) and durations, read and written.

One table renderer and one duration format for every command, so that ``gpt2lab runs``, ``presets``,
``evaluate``, ``export`` and the benchmarks line their columns up the same way and say "4 min 19 s" alike.
Bottom layer: it imports nothing of gpt2lab but ``errors``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from gpt2lab.errors import ConfigError

DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?")
WIDE = 100_000  # characters: a table is never wrapped or cut to the terminal; a pager or a file takes it whole


def table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    markdown: bool = False,
    align: str | Sequence[str] = "left",
    wrap: dict[str, int] | None = None,
) -> str:
    """``rows`` under their ``columns``, one line each: aligned plain text for a terminal (the header, a rule,
    the rows), or a Markdown table. ``align``: ``left``/``right`` for every column, or one per column. ``wrap``:
    the columns whose text wraps, at that many characters (plain text only). Cells are shown as ``str`` gives
    them; format numbers before."""
    aligns = [align] * len(columns) if isinstance(align, str) else list(align)
    grid = Table(
        box=box.MARKDOWN if markdown else box.SIMPLE_HEAD,
        show_edge=markdown,
        pad_edge=markdown,
        padding=(0, 1) if markdown else (0, 2, 0, 0),
        header_style=None,
        highlight=False,
    )
    for name, how in zip(columns, aligns, strict=True):
        width = None if markdown else (wrap or {}).get(name)
        grid.add_column(name, justify=how, no_wrap=width is None, max_width=width)
    for row in rows:
        grid.add_row(*(str(cell).replace("|", "\\|") if markdown else str(cell) for cell in row))
    out = io.StringIO()
    Console(file=out, width=WIDE, color_system=None, emoji=False, markup=False, highlight=False).print(grid)
    lines = [line.rstrip() for line in out.getvalue().splitlines()]
    return "\n".join(line for line in lines if line)


def parse_duration(text: Any, key: str = "time_budget") -> float:
    """Seconds in ``90s``, ``10m``, ``2h``, ``1h30m``, ``1d``, ``HH:MM:SS``, ``DD:HH:MM:SS`` (Lightning's
    ``max_time``) or a plain number of seconds. Anything else is a ``ConfigError`` naming ``key``."""
    value = str(text).strip().lower().replace(" ", "")
    seconds: float | None = None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif re.fullmatch(r"\d+(:\d{1,2}){1,3}", value):
        parts = [int(p) for p in value.split(":")]
        if all(p < 60 for p in parts[1:]) and (len(parts) < 4 or parts[1] < 24):
            seconds = float(sum(p * u for p, u in zip(reversed(parts), (1, 60, 3600, 86400), strict=False)))
    elif value and (match := DURATION.fullmatch(value)) and any(match.groups()):
        seconds = sum(float(v) * u for v, u in zip(match.groups(), (86400, 3600, 60, 1), strict=True) if v)
    if seconds is None or seconds <= 0:
        raise ConfigError(
            f"{key}={text!r}: expected a positive duration such as 90s, 10m, 2h, 1h30m or HH:MM:SS (01:30:00)"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 10 min``, ``12 days``, ``3.7 years``: how long, at a glance, however long."""
    if seconds >= 48 * 3600:
        days = seconds / 86400
        return f"{days:,.0f} days" if days < 730 else f"{days / 365.25:,.1f} years"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
