"""``python -m gpt2lab.sweep report|export-best``: an Optuna study's trials, and its best trial as a recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2lab.errors import ConfigError
from gpt2lab.sweep.optuna_sweeper import export_best, report

SOURCE_CONF = Path(__file__).resolve().parents[2] / "conf"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.sweep", description="Optuna study utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export-best", help="write the best trial as conf/experiment/<name>.yaml")
    export.add_argument(
        "--storage", required=True, help="the study's storage URL, e.g. sqlite:///outputs/optuna/gpt2lab/optuna.db"
    )
    export.add_argument("--study-name", default="gpt2lab")
    export.add_argument("--name", required=True, help="experiment name: python train.py experiment=<name>")
    export.add_argument("--out", default=str(SOURCE_CONF), help="config directory")
    rep = sub.add_parser("report", help="trial states and training steps of a study")
    rep.add_argument("--storage", required=True)
    rep.add_argument("--study-name", default="gpt2lab")
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            print(report(args.storage, args.study_name))
            return
        path = export_best(args.storage, args.study_name, args.name, Path(args.out))
    except (ConfigError, KeyError) as e:
        parser.exit(1, f"Error: {e}\n")
    config_dir = "" if Path(args.out).resolve() == SOURCE_CONF else f" --config-dir {args.out}"
    print(f"Wrote {path}; reproduce it with: python train.py experiment={args.name}{config_dir}")


if __name__ == "__main__":
    main()
