"""The one exception type a user should ever see from gpt2lab: a message that names the problem and the fix."""

import sys
from typing import NoReturn


class ConfigError(ValueError):
    """Bad input: a config value, a file, a checkpoint. The message says which and what was expected."""


def refuse(message: str) -> NoReturn:
    """Stop a Hydra callback on bad input, before anything is written. Hydra turns an exception raised by a
    callback into a warning, so exit as ``train.py`` does on bad input: one ``Error:`` line, no traceback."""
    print(f"\nError: {message}", file=sys.stderr)
    raise SystemExit(1)
