"""Shared fixtures: a small corpus made from the bundled one, and the real config tree composed by Hydra."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from gpt2lab.config import register_schemas
from gpt2lab.data.pystdlib import pystdlib_documents

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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus_file, cache_dir):
    """A tiny model trained for 40 steps (long enough to use its context), and its run directory."""
    from gpt2lab.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(
            "train",
            overrides=[
                *TINY,
                f"data.path={corpus_file}",
                f"paths.cache_dir={cache_dir}",
                "trainer.max_steps=40",
                "trainer.val_check_interval=20",
                "sample=null",
                "test=false",
            ],  # fmt: skip
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
        del cfg.hydra
    train(cfg)
    GlobalHydra.instance().clear()
    return run


def run_cli(
    *args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python train.py ARGS`` as a user would, from ``cwd``."""
    full_env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "GPT2LAB_TRUSTED_TARGETS": "helpers.*",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
