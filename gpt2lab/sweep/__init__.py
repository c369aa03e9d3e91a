"""Sweeps: Hydra multiruns and Optuna studies over ``python train.py``.

- ``summary``: ``SweepSummary``, the Hydra callback that keeps ``summary.csv``, ``summary.md`` and ``curves.png``
  in the sweep directory (the tables and figures of ``gpt2lab.runs``), and ``job_outcome``, which decides each
  job's status for that table and for the Optuna study alike.
- ``optuna_sweeper``: ``OptunaSweeper`` (``hydra/sweeper=gpt2lab_optuna``) and ``OptunaPruning``.
- ``studies``: a study on disk (storage, heartbeats, results and plots), and reading it back for
  ``python -m gpt2lab.sweep report|export-best``.
- ``plugin``: the thin classes Hydra registers through the ``hydra.plugins`` entry point (pyproject.toml): the
  Optuna sweeper and ``gpt2lab_basic``, Hydra's grid sweeper ending in a failed job's ``Error:`` line.

Nothing is imported here: Hydra loads ``plugin`` on every run, and with it this package.
"""
