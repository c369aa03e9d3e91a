"""gpt2lab's Hydra sweeper plugins, registered through the ``hydra.plugins`` entry point (pyproject.toml).

Kept thin and free of heavy imports: Hydra loads it on every run.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper

from gpt2lab.hydra_internals import BasicSweeper


class GPT2LabOptunaSweeper(Sweeper):
    """``hydra/sweeper=gpt2lab_optuna``; the work is done by ``gpt2lab.sweep.optuna_sweeper.OptunaSweeper``."""

    def __init__(self, **kwargs: Any) -> None:
        from gpt2lab.sweep.optuna_sweeper import OptunaSweeper

        self.sweeper = OptunaSweeper(**kwargs)

    def setup(self, **kwargs: Any) -> None:
        self.sweeper.setup(**kwargs)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)


class GPT2LabBasicSweeper(BasicSweeper):
    """``hydra/sweeper=gpt2lab_basic``, gpt2lab's default (conf/hydra/default.yaml): Hydra's grid sweeper, except
    that a sweep in which a job stopped on bad input ends with that job's ``Error:`` line (its overrides are on
    the line above, the other jobs' outcomes in the sweep summary) instead of its traceback."""

    def sweep(self, arguments: list[str]) -> Any:
        from gpt2lab.errors import ConfigError, refuse

        try:
            return super().sweep(arguments)
        except ConfigError as e:
            refuse(str(e))
