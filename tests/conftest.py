"""Shared fixtures: a small corpus made from the bundled one, and the real config tree composed by Hydra.

Every cache the suite writes (gpt2lab's tokenizers, token files and probes; Hugging Face's datasets and Hub files)
lives in one temporary directory, ``TEST_CACHE``, never in the user's ``~/.cache/gpt2lab`` or
``~/.cache/huggingface`` nor in a ``GPT2LAB_CACHE_DIR`` set outside (CI sets one): a test that omits
``paths.cache_dir`` gets it too, and a test that writes to the user's caches anyway fails (``own_caches``).
"""

# ruff: noqa: E402 (the caches are pointed at before the imports of datasets and huggingface_hub, which read them then)
from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path


def _user_caches() -> tuple[str, ...]:
    """The caches outside the suite that gpt2lab and Hugging Face would use here: ``GPT2LAB_CACHE_DIR`` or
    ``~/.cache/gpt2lab``, and ``HF_HOME`` (or ``~/.cache/huggingface``) with any cache path set on its own."""
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    paths = [home / "gpt2lab", Path(os.environ.get("HF_HOME") or home / "huggingface")]
    paths += [Path(os.environ[var]) for var in ("GPT2LAB_CACHE_DIR", *HF_CACHE_VARS) if os.environ.get(var)]
    expanded = {os.path.abspath(os.path.expanduser(p)) for p in paths}
    return tuple(sorted(expanded | {os.path.realpath(p) for p in expanded}))


# Hugging Face's cache paths that win over HF_HOME when set: unset for the suite, so that HF_HOME decides them all
HF_CACHE_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_DATASETS_CACHE",
                 "HF_MODULES_CACHE", "TRANSFORMERS_CACHE")  # fmt: skip
USER_CACHES = _user_caches()
TEST_CACHE = Path(tempfile.mkdtemp(prefix="gpt2lab-test-caches-"))
CACHE_ENV = {"GPT2LAB_CACHE_DIR": str(TEST_CACHE / "gpt2lab"), "HF_HOME": str(TEST_CACHE / "huggingface")}
os.environ.update(CACHE_ENV)  # inherited by the commands the tests start
for _var in HF_CACHE_VARS:
    os.environ.pop(_var, None)
# A cache that holds the suite's (a user's GPT2LAB_CACHE_DIR=/tmp) is not guarded: the suite writes inside it
GUARDED_CACHES = tuple(p for p in USER_CACHES if not str(TEST_CACHE).startswith(p.rstrip(os.sep) + os.sep))
USER_CACHE_WRITES: list[str] = []  # paths under GUARDED_CACHES this process wrote, created, moved or removed
_PATH_EVENTS = {"open": (0,), "os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,), "shutil.rmtree": (0,),
                "os.rename": (0, 1), "os.symlink": (1,), "os.link": (1,)}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _note_user_cache_writes(event: str, args: tuple) -> None:
    """An audit hook: notes this process's writes under the user's caches (files opened for writing, directories
    made, files moved or removed). Commands the tests start inherit ``CACHE_ENV`` instead."""
    if event not in _PATH_EVENTS or not GUARDED_CACHES:
        return
    try:
        if event == "open":
            mode, flags = args[1], args[2]
            if not (isinstance(mode, str) and any(c in mode for c in "wax+")) and not (
                isinstance(flags, int) and flags & _WRITE_FLAGS
            ):
                return
        for i in _PATH_EVENTS[event]:
            if isinstance(args[i], str | bytes | os.PathLike):
                path = os.path.abspath(os.fsdecode(args[i]))
                if any(path == root or path.startswith(root + os.sep) for root in GUARDED_CACHES):
                    USER_CACHE_WRITES.append(f"{event} {path}")
    except Exception:  # an audit hook's error would fail the operation it audits
        pass


sys.addaudithook(_note_user_cache_writes)

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


@pytest.fixture(autouse=True)
def lm_eval_logging() -> Iterator[None]:
    """lm-eval's command line (and ``simple_evaluate`` given a verbosity) gives its logger a handler on the
    ``sys.stderr`` of the moment, once per process, and stops it propagating: in a test, a stream captured for that
    test and closed after it, so later tests would print "Logging error" tracebacks. Each test leaves the logger as a
    new process has it, whichever test (or module fixture) configured it."""
    yield
    logger = logging.getLogger("lm_eval")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    if "lm_eval.utils" in sys.modules:
        sys.modules["lm_eval.utils"]._LOGGING_CONFIGURED = False


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


@pytest.fixture(autouse=True)
def own_caches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test's caches are the suite's (``CACHE_ENV`` set again, should a test before have changed it), and a
    test that writes to the user's caches fails, naming what it wrote (or a session fixture it set up did)."""
    for var, value in CACHE_ENV.items():
        monkeypatch.setenv(var, value)
    for var in HF_CACHE_VARS:
        monkeypatch.delenv(var, raising=False)
    yield
    written = USER_CACHE_WRITES[:]
    USER_CACHE_WRITES.clear()
    if written:
        pytest.fail(f"wrote to the user's caches, not the suite's ({TEST_CACHE}): " + "; ".join(written[:10]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first, and the full default run (minutes) first of all: under ``-n`` (``nox -s tests slow``)
    the shorter tests then run beside the long ones instead of after them."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, item.path.name != "test_default_run.py"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session for writes to the user's caches that no test's teardown saw (a session fixture's teardown),
    then remove the suite's caches."""
    if USER_CACHE_WRITES:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"Error: the suite wrote to the user's caches: {'; '.join(USER_CACHE_WRITES[:10])}", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The suite's gpt2lab cache (``GPT2LAB_CACHE_DIR``, shared by tests that name it and tests that omit it)."""
    path = Path(CACHE_ENV["GPT2LAB_CACHE_DIR"])
    path.mkdir(exist_ok=True)
    return path


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
            "optimizer=adamw",  # the recipe the evaluation tests' expectations were measured on
            "scheduler=warmup_cosine",
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
