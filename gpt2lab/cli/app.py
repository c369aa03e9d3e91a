"""The one shape of gpt2lab's Hydra commands (train, evaluate, generate, chat, export, check).

Each verb's ``__main__`` is ``main = hydra_app("<verb>", task)``: the config tree and its schemas, ``group=null``
read as ``~group`` (what users of Hydra tools type; Hydra itself only knows the latter), free text in the keys
that take it quoted for Hydra's grammar, only trusted ``_target_``s built, bad input as one ``Error:`` line, and
Ctrl-C before Lightning takes over (start-up, data preparation) as a short note rather than a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import hydra
from omegaconf import DictConfig

from gpt2lab.config import TRUSTED_TARGETS, config_path, literal_overrides, null_group_overrides, register_schemas
from gpt2lab.errors import report_errors

R = TypeVar("R")


def hydra_app(
    config_name: str, task: Callable[[DictConfig], R], literal_keys: tuple[str, ...] = ()
) -> Callable[[], Any]:
    """The command-line entry of ``task`` on ``conf/<config_name>.yaml``: call it with ``sys.argv`` as the
    command line has it. ``literal_keys``: keys whose value is any text (``prompt=def f(n):``), taken as typed."""

    def main() -> Any:
        register_schemas()
        sys.argv = literal_overrides(null_group_overrides(sys.argv), literal_keys)
        app = hydra.main(config_path=config_path(), config_name=config_name, execution_whitelist=TRUSTED_TARGETS)
        try:
            return app(report_errors(task))()
        except KeyboardInterrupt:  # before Lightning's own handling (start-up, data preparation): no traceback
            print(f"\nStopped: {config_name} was interrupted (Ctrl-C).", file=sys.stderr)
            raise SystemExit(130) from None

    main.__doc__ = (
        f"Entry point of ``gpt2lab {config_name}``: ``conf/{config_name}.yaml`` with the command line's overrides."
    )
    return main
