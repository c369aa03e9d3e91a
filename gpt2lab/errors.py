"""The one exception type a user should ever see from gpt2lab: a message that names the problem and the fix."""

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

log = logging.getLogger("gpt2lab")
R = TypeVar("R")


class ConfigError(ValueError):
    """Bad input: a config value, a file, a checkpoint. The message says which and what was expected."""


def refuse(message: str) -> NoReturn:
    """Stop a Hydra callback on bad input, before anything is written. Hydra turns an exception raised by a
    callback into a warning, so exit as ``train.py`` does on bad input: one ``Error:`` line, no traceback."""
    print(f"\nError: {message}", file=sys.stderr)
    raise SystemExit(1)


def report_errors(task: Callable[[Any], R]) -> Callable[[Any], R]:
    """Wrap a Hydra task function (train, evaluate, ...): bad input ends in one ``Error:`` line and exit
    status 1, or, inside a multirun, in a ConfigError the sweeper records against that job; a bug keeps
    its traceback."""

    @functools.wraps(task)
    def wrapper(cfg: Any) -> R:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            return task(cfg)
        except Exception as e:
            message = user_error(e)
            if message is None:
                raise
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise ConfigError(message) from None  # the sweeper records it against this job and goes on
            log_to_files(message)
            refuse(message)

    return wrapper


def log_to_files(message: str) -> None:
    """Record ``message`` in the run's log files (``train.log``, where ``gpt2lab runs`` finds a run's error), not
    on the console, where ``refuse`` prints it once as the ``Error:`` line."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def user_error(e: BaseException) -> str | None:
    """The message for an error caused by the user's input, or None for a bug (which keeps its traceback)."""
    from hydra.errors import InstantiationException

    cause: BaseException | None = e
    while cause is not None:  # Hydra's instantiate wraps errors raised by the classes it builds
        if isinstance(cause, ConfigError):
            return str(cause)
        cause = cause.__cause__
    if isinstance(e, InstantiationException) and "execution whitelist" in str(e):
        return f"{e}\nTo use your own classes as _target_, trust their package: GPT2LAB_TRUSTED_TARGETS='mypkg.*'"
    return None
