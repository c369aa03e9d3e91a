"""Developer sessions: ``nox -s tests`` (the CI suite), ``nox -s slow``, ``nox -s gpu``, ``nox -s lint``, ``nox -s docs``.

Sessions reuse the current interpreter's environment (``python=False``): PyTorch is large, and the
project is installed once with ``pip install -e ".[dev]"`` (after ``pip install torch==2.13.0`` on CPU).
"""

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The default suite: unit tests and short CPU training runs (a few minutes)."""
    session.run("pytest", *session.posargs)


@nox.session(python=False)
def slow(session: nox.Session) -> None:
    """Long end-to-end runs, marked ``slow``: the default preset's full training, Optuna studies
    (resume, shared workers, pruning, joblib, PostgreSQL)."""
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session(python=False)
def gpu(session: nox.Session) -> None:
    """The tests that need a CUDA GPU, marked ``gpu``: the CUDA-graph decoder, the fused loss on CUDA, compiled
    training, FSDP. Run on a GPU host whenever a change touches those paths; without CUDA each one skips, saying so."""
    session.run("pytest", "-m", "gpu", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=False)
def docs(session: nox.Session) -> None:
    """The manual (``docs/``, ``mkdocs.yml``) built into ``site/``: ``--strict`` fails on a broken link or anchor and
    on a page missing from the nav."""
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})
