"""gpt2lab's Hydra sweeper plugin, registered through the ``hydra.plugins`` entry point (pyproject.toml).

Kept thin and free of heavy imports: Hydra loads it on every run.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper


class GPT2LabOptunaSweeper(Sweeper):
    """``hydra/sweeper=gpt2lab_optuna``; the work is done by ``gpt2lab.sweep.optuna_sweeper.OptunaSweeper``."""

    def __init__(self, **kwargs: Any) -> None:
        from gpt2lab.sweep.optuna_sweeper import OptunaSweeper

        self.sweeper = OptunaSweeper(**kwargs)

    def setup(self, **kwargs: Any) -> None:
        self.sweeper.setup(**kwargs)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
