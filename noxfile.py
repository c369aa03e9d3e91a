"""Developer sessions: ``nox -s tests`` (the CI suite), ``nox -s slow``, ``nox -s gpu``, ``nox -s lint``, ``nox -s docs``.

Sessions reuse the current interpreter's environment (``python=False``): PyTorch is large, and the
project is installed once with ``pip install -e ".[dev]"`` (after ``pip install torch==2.13.0`` on CPU).
"""

import nox

nox.options.sessions = ["lint", "tests"]


# pytest-xdist: one worker per core (at most 4); a worker that runs out of tests takes half of another's. Most
# tests are tiny models whose time goes to Python and imports, not to torch's threads, so two workers on two cores
# take about half the time. The 15 slowest tests are listed at the end: where the suite's time goes.
PARALLEL = ("--numprocesses=auto", "--maxprocesses=4", "--dist=worksteal", "--durations=15")


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The default suite: unit tests and short CPU training runs, spread over the cores."""
    session.run("pytest", *PARALLEL, *session.posargs)


@nox.session(python=False)
def slow(session: nox.Session) -> None:
    """Long end-to-end runs, marked ``slow``: the default preset's full training (started first, the others
    beside it), Optuna studies (resume, shared workers, pruning, joblib, PostgreSQL), DDP, compiled training."""
    session.run("pytest", "-m", "slow", *PARALLEL, *session.posargs)


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
