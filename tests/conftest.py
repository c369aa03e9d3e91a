"""Shared fixtures: a small corpus made from the bundled one, and the real config tree composed by Hydra."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import execution_whitelist
from omegaconf import DictConfig, open_dict

from gpt2lab.config import register_schemas
from gpt2lab.data.pystdlib import pystdlib_documents

ENTRY_POINTS = (
    "gpt2lab.train.__main__",
    "gpt2lab.evaluate.__main__",
    "gpt2lab.generate.__main__",
    "gpt2lab.chat.__main__",
    "gpt2lab.cli",
)
for _module in ENTRY_POINTS:
    importlib.import_module(_module)
# The warning filters of an entry point's process (``run_main`` applies them): those its modules set on import
# (gpt2lab.train's, Lightning's), which pytest drops once it has collected the tests, then Python's defaults.
PROCESS_WARNING_FILTERS = [
    *warnings.filters,
    *[
        ("ignore", None, c, None, 0)
        for c in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    ],
]

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# A model and run small enough for a test to train in seconds on one CPU core.
TINY = [
    "data=files",
    "tokenizer=bpe",
    "tokenizer.vocab_size=320",
    "tokenizer.show_progress=false",
    "model.context_length=32",
    "model.d_model=32",
    "model.num_heads=2",
    "model.num_layers=2",
    "model.d_ff=64",
    "data.batch_size=8",
    "trainer.max_steps=8",
    "trainer.val_check_interval=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "sample.max_new_tokens=8",
]


@pytest.fixture(autouse=True)
def rank_zero():
    """Building a Trainer as rank r of a launcher's job (tests/test_multinode.py) sets Lightning's process-wide
    rank to r, after which loggers of later in-process runs would write nothing: put rank 0 back."""
    yield
    import lightning_fabric.utilities.rank_zero as fabric_rank_zero
    import pytorch_lightning.utilities.rank_zero as pl_rank_zero

    for module in (fabric_rank_zero, pl_rank_zero):
        module.rank_zero_only.rank = 0


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 200 KB of real text (stdlib modules and pydoc topics), one paragraph per blank-line block."""
    _, texts = pystdlib_documents()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    picked, size = [], 0
    for text in texts[::7]:
        chunk = text[:3000].strip()
        picked.append(chunk)
        size += len(chunk)
        if size > 200_000:
            break
    path.write_text("\n\n".join(picked))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def compose_cfg(tmp_path: Path, cache_dir: Path, corpus_file: Path) -> Callable[..., DictConfig]:
    """Compose ``conf/train.yaml`` with the tiny settings plus ``overrides``, as the CLI would."""

    def _compose(*overrides: str, tiny: bool = True) -> DictConfig:
        register_schemas()
        GlobalHydra.instance().clear()
        base = [*TINY, f"data.path={corpus_file}"] if tiny else []
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            cfg = compose(
                "train",
                overrides=[*base, f"paths.cache_dir={cache_dir}", *overrides],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            del cfg.hydra
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def train_in_process(run: Path, overrides: list[str]) -> Path:
    """Train ``conf/train.yaml`` with ``overrides`` in this process, into the run directory ``run``."""
    from gpt2lab.train.run import train

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
        del cfg.hydra
    train(cfg)
    GlobalHydra.instance().clear()
    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_file, cache_dir):
    """A tiny model trained for 40 steps (long enough to use its context), and its run directory."""
    return train_in_process(
        tmp_path_factory.mktemp("trained") / "run",
        [
            *TINY,
            f"data.path={corpus_file}",
            f"paths.cache_dir={cache_dir}",
            "trainer.max_steps=40",
            "trainer.val_check_interval=20",
            "sample=null",
            "test=false",
        ],
    )


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``python train.py`` the tests start: the test callbacks (``helpers.*``) importable
    and trusted as ``_target_``."""
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "GPT2LAB_TRUSTED_TARGETS": "helpers.*",
        **(env or {}),
    }


def run_cli(
    *args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` as a user would, from ``cwd``."""
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(*args: str, cwd: Path, output: Path) -> subprocess.Popen:
    """Start ``python train.py ARGS`` from ``cwd`` and go on (the test waits for it); its output goes to ``output``."""
    with output.open("w") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args],
            cwd=cwd,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> Callable[..., subprocess.CompletedProcess]:
    """Run an entry point's ``main()`` in this process, as its command line would (``sys.argv``, working
    directory, environment), and return what ``run_cli`` returns: the exit status, stdout and stderr.

    Each real process pays several seconds of imports (torch, Lightning, Hydra); one test per entry point
    keeps a real process (``run_cli`` and the like), the others run here. Bad input ends as in a process:
    the ``Error:`` line on stderr and ``SystemExit(1)``; a bug, as Hydra reports it, with its traceback."""

    def _run(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        entry = importlib.import_module(module)
        if hasattr(entry, "__path__"):  # a package: its command is its __main__
            entry = importlib.import_module(f"{module}.__main__")
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        capsys.readouterr()  # only this run's output
        returncode = 0
        with monkeypatch.context() as patch:
            patch.chdir(cwd)
            patch.setattr(sys, "argv", [entry.__file__, *args])
            # Hydra re-raises a bug's exception under a tracer (a debugger, coverage); a process reports it.
            patch.setattr("hydra._internal.utils.is_under_debugger", lambda: False)
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            try:
                # Warnings as a process shows them: filtered as there, then printed to stderr.
                with warnings.catch_warnings(record=True) as shown, execution_whitelist("helpers.*"):
                    warnings.filters[:] = PROCESS_WARNING_FILTERS
                    warnings._filters_mutated()
                    try:
                        entry.main()
                    finally:
                        for w in shown:
                            sys.stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
            except SystemExit as e:
                returncode = e.code if isinstance(e.code, int) else int(e.code is not None)
            finally:
                # Hydra configured logging for the run (a console handler on the captured stdout, the run's
                # log file): close its handlers and give the root logger back pytest's.
                for handler in root.handlers:
                    if handler not in handlers:
                        handler.close()
                root.handlers[:] = handlers
                root.setLevel(level)
                GlobalHydra.instance().clear()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([module, *args], returncode, out, err)

    return _run


@pytest.fixture
def train_cli(run_main) -> Callable[..., subprocess.CompletedProcess]:
    """``python train.py ARGS`` from ``cwd``, as ``run_cli`` runs it, but in this process."""

    def _train(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return run_main("gpt2lab.train", *args, cwd=cwd, env=env)

    return _train


def export_all(ckpt: Path, root: Path, *overrides: str) -> Path:
    """``python -m gpt2lab.export ckpt=<ckpt> output_dir=<root>/all [overrides]`` in this process, composed as the
    command line composes it (the export's log in ``<root>/log``); returns the export directory."""
    from gpt2lab.exporters.export import export

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("export", overrides=[f"ckpt={ckpt}", f"output_dir={root / 'all'}", *overrides],
                      return_hydra_config=True)  # fmt: skip
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "log")
        del cfg.hydra
    export(cfg)
    GlobalHydra.instance().clear()
    return root / "all"
