"""``python -m gpt2lab.presets`` / ``gpt2lab presets``: the recipes in ``conf/preset/`` with their size and an
estimated training time here (``ls``, the default), a copy of one to edit (``cp``), the one for a goal
(``--recommend``). Config overrides (``key=value``) may come anywhere on the line, as on ``train.py``'s."""

from __future__ import annotations

import argparse
import sys

from gpt2lab.config.experiments import searchpath_flag
from gpt2lab.errors import ConfigError
from gpt2lab.presets.catalog import GOALS, copy_preset, list_presets, recommend_from

EXAMPLES = """examples:
  gpt2lab presets ls
  gpt2lab presets ls --only tiny,small
  gpt2lab presets cp small my_recipe      # then: python train.py experiment=my_recipe
  gpt2lab presets --recommend goal=learning time_budget_hours=5
"""


def parser() -> argparse.ArgumentParser:
    listing = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)  # before or after "ls"
    listing.add_argument("--only", metavar="NAMES", help="comma-separated presets to list (default: all)")
    listing.add_argument("--refresh", action="store_true", help="measure again, ignoring cached probes")
    listing.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    top = argparse.ArgumentParser(
        prog="gpt2lab presets",
        parents=[listing],
        description="The recipes in conf/preset/ with their size and an estimated training time on this machine, "
        "measured by a short probe of each preset's model on this device (cached). Also python -m gpt2lab.presets.",
        epilog=EXAMPLES + f"goals: {', '.join(f'{g} ({w})' for g, (_, _, w) in GOALS.items())}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--recommend", nargs="*", metavar="KEY=VALUE", help="goal=learning|quality|code|chat|"
                     "summarization and time_budget_hours=H: the preset that fits, and why")  # fmt: skip
    commands = top.add_subparsers(dest="command", title="commands", metavar="{ls,cp}")
    commands.add_parser("ls", parents=[listing], help="the presets table (the default); then config overrides")
    cp = commands.add_parser("cp", usage="gpt2lab presets cp NAME NEW_NAME", help="copy a preset to edit, as "
                             "conf/experiment/NEW_NAME.yaml (never replacing one)")  # fmt: skip
    cp.add_argument("names", nargs="*", metavar="NAME NEW_NAME")
    return top


def main(argv: list[str] | None = None) -> None:
    """``gpt2lab presets [ls | cp NAME NEW_NAME] [--recommend goal=G time_budget_hours=H] [overrides]``."""
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    command_line = parser()
    args = command_line.parse_args([a for a in argv if "=" not in a or a.startswith("-")])
    options = vars(args)
    try:
        if args.recommend is not None:
            print(recommend_from([*args.recommend, *overrides], options.get("refresh", False)))
        elif args.command == "cp":
            if len(args.names) != 2:
                raise ConfigError("presets cp takes two names: gpt2lab presets cp small my_recipe")
            target = copy_preset(*args.names)
            run = f"python train.py experiment={args.names[1]}{searchpath_flag(target.parent.parent)}"
            print(f"Wrote {target}: edit it, then run it with\n  {run}")
        else:
            names = [n.strip() for n in options.get("only", "").split(",") if n.strip()]
            print(list_presets(names or None, overrides, options.get("refresh", False), options.get("markdown", False)))
    except ConfigError as e:
        command_line.exit(1, f"Error: {e}\n")


if __name__ == "__main__":
    main()
