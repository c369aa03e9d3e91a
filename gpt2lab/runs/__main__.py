"""``python -m gpt2lab.runs outputs/`` / ``gpt2lab runs``: the runs and multirun jobs under a directory as a table
(or CSV), filtered and sorted, with their validation curves drawn on request."""

from __future__ import annotations

import argparse
import os
import sys

from gpt2lab.errors import ConfigError
from gpt2lab.runs.reading import COLUMNS
from gpt2lab.runs.report import format_table, run_table, to_csv


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


if __name__ == "__main__":
    main()
