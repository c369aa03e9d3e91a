"""``python -m gpt2lab.sweep report|export-best``: an Optuna study's trials, and its best trial as a recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from gpt2lab.config.experiments import default_config_dir, searchpath_flag
from gpt2lab.errors import ConfigError
from gpt2lab.sweep.studies import export_best, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.sweep", description="Optuna study utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export-best", help="write the best trial as conf/experiment/<name>.yaml")
    export.add_argument(
        "--storage", required=True, help="the study's storage URL, e.g. sqlite:///outputs/optuna/gpt2lab/optuna.db"
    )
    export.add_argument("--study-name", default="gpt2lab")
    export.add_argument("--name", required=True, help="experiment name: python train.py experiment=<name>")
    export.add_argument(
        "--out",
        default=None,
        help="config directory (default: conf/ of a source checkout, else ./conf, used with --config-dir conf)",
    )
    export.add_argument("--force", action="store_true", help="replace conf/experiment/<name>.yaml if it exists")
    rep = sub.add_parser("report", help="trial states and training steps of a study")
    rep.add_argument("--storage", required=True)
    rep.add_argument("--study-name", default="gpt2lab")
    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            print(report(args.storage, args.study_name))
            return
        out = Path(args.out) if args.out is not None else default_config_dir()
        path = export_best(args.storage, args.study_name, args.name, out, overwrite=args.force)
    except (ConfigError, KeyError) as e:
        parser.exit(1, f"Error: {e}\n")
    print(f"Wrote {path}; reproduce it with: python train.py experiment={args.name}{searchpath_flag(out)}")


if __name__ == "__main__":
    main()
