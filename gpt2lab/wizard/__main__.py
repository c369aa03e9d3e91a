"""``python -m gpt2lab.wizard`` / ``gpt2lab wizard``: a recipe of your own, asked step by step, written as
``conf/experiment/<name>.yaml``; with ``--name`` it asks nothing (each answer its flag, or the preset's).

    python -m gpt2lab.wizard
    python -m gpt2lab.wizard --preset tiny --data files --data-path my.txt --max-steps 300 --name my_run
"""

from __future__ import annotations

import argparse
import sys

from gpt2lab.config import config_tree, group_options
from gpt2lab.config.experiments import default_config_dir
from gpt2lab.errors import ConfigError
from gpt2lab.wizard.questions import FLAGS
from gpt2lab.wizard.wizard import Wizard, ask_preset


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpt2lab wizard",
        description="Write conf/experiment/<name>.yaml in five steps: dataset, tokenizer, model check, training "
        "parameters, validation and summary. With --name it asks nothing: each answer is its flag or the preset's.",
    )
    parser.add_argument(
        "--preset", default=None, help=f"the recipe to start from: {', '.join(group_options('preset'))}"
    )
    parser.add_argument("--name", help="the experiment's name; given, the wizard asks nothing")
    for flag in FLAGS:
        parser.add_argument(flag, default=None, metavar="VALUE")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                        help="run the model check-up (asked when interactive; off with --name unless given)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace an experiment of that name")
    parser.add_argument("--config-dir", default=str(default_config_dir()), help="the config tree it goes into")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m gpt2lab.wizard`` and ``gpt2lab wizard``."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    interactive = args.name is None
    presets = group_options("preset")
    try:
        if args.preset is None:
            args.preset = "tiny" if not interactive else ask_preset(presets)
        if args.preset not in presets:
            raise ConfigError(
                f"--preset={args.preset}: no conf/preset/{args.preset}.yaml; presets: {', '.join(presets)}"
            )
        with config_tree():
            Wizard(args, ask=input if interactive else None).run()
    except ConfigError as e:
        print(f"\nError: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except (EOFError, KeyboardInterrupt):
        print("\nStopped: nothing written.", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
