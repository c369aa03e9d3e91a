"""DDP on CPU (two processes, gloo) through the real CLI: the known traps of Hydra + Lightning DDP."""

import csv
import json

import pytest
from conftest import TINY, run_cli

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "sample=null"]


def _args(corpus_file, cache_dir, *extra):
    return [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", *DDP, *extra]


@pytest.mark.slow
def test_ddp_run_writes_one_run_directory(tmp_path, corpus_file, cache_dir):
    result = run_cli(*_args(corpus_file, cache_dir, "hydra.run.dir=outputs/run"), cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["run"]  # rank 1 did not make its own run
    run = tmp_path / "outputs" / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 8 and results["metrics"]["test/loss"] > 0
    assert (run / "train_ddp_rank_1.log").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "Starting with 2 processes" in result.stdout + result.stderr


@pytest.mark.slow
def test_ddp_jobs_inside_a_multirun(tmp_path, corpus_file, cache_dir):
    """Each job launches its own ranks in its own directory; no rank re-runs the sweep."""
    args = _args(corpus_file, cache_dir, "model.num_layers=1,2", "hydra.sweep.dir=sweep", "test=false")
    result = run_cli("-m", *args, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    for job in ("0", "1"):
        assert (sweep / job / "train_ddp_rank_1.log").is_file() and (sweep / job / "results.json").is_file()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
