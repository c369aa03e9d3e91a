"""The check every export ends with: the exported model computes what gpt2lab's model computes."""

from __future__ import annotations

from gpt2lab.errors import ConfigError


class ExportMismatch(ConfigError):
    """An exported model whose outputs differ from gpt2lab's by more than the tolerance."""


def check_close(max_abs_diff: float, tolerance: float, what: str) -> None:
    """Fail loudly when an export computes something else than the model it came from."""
    if not max_abs_diff <= tolerance:  # NaN fails too
        raise ExportMismatch(
            f"{what} differs from gpt2lab's model by up to {max_abs_diff:.3g} (tolerance {tolerance:g}) on random "
            "inputs, so the export is wrong and nothing was written (raise tolerance=... only for a known cause, "
            "e.g. fp16)"
        )
