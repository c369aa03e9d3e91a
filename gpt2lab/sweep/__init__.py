"""Sweeps: Hydra multiruns and Optuna studies over ``python train.py``.

- ``summary``: ``SweepSummary``, the Hydra callback that keeps ``summary.csv``, ``summary.md`` and ``curves.png``
  in the sweep directory (the tables and figures of ``gpt2lab.runs``), and ``job_outcome``, which decides each
  job's status for that table and for the Optuna study alike.
- ``optuna_sweeper``: ``OptunaSweeper`` (``hydra/sweeper=gpt2lab_optuna``), ``OptunaPruning``, and the study
  utilities behind ``python -m gpt2lab.sweep report|export-best``.
- ``plugin``: the thin class Hydra registers through the ``hydra.plugins`` entry point (pyproject.toml).

Nothing is imported here: Hydra loads ``plugin`` on every run, and with it this package.
"""
