"""DDP on CPU (two processes, gloo) through the real CLI: the known traps of Hydra + Lightning DDP."""

import csv
import json

import pytest
import torch
from conftest import TINY, run_cli
from test_train import final_val_loss

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2", "sample=null"]


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
    assert [r["status"] for r in rows] == ["finished", "finished"]
    for job in ("0", "1"):
        assert (sweep / job / "train_ddp_rank_1.log").is_file() and (sweep / job / "results.json").is_file()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_ddp_run_stopped_mid_epoch_resumes_to_the_same_final_loss(tmp_path, corpus_file, cache_dir):
    """Each rank resumes at its own place in its own share of the epoch's permutation. With optimizer=muon: both
    optimizers' state comes back on each rank (AdamW's under DDP is resumed in test_multinode and test_faults)."""
    # 128-token contexts: the train split makes 977 windows, 488 per rank, 10 batches of 48 per rank and
    # epoch. The stop at step 12 (validation, which saves last.ckpt) is 2 batches into the second epoch.
    # Dropout on, so that the RNG state has to be restored too; one LR schedule for all three runs.
    common = [
        "model.context_length=128", "data.batch_size=48", "scheduler.max_steps=24", "model.dropout=0.1",
        "model.residual_dropout=0.1", "model.attention_dropout=0.1", "test=false", "optimizer=muon",
    ]  # fmt: skip
    runs = {name: tmp_path / name for name in ("whole", "stopped", "resumed")}

    def fit(name: str, *extra: str) -> None:
        result = run_cli(*_args(corpus_file, cache_dir, f"hydra.run.dir={runs[name]}", *common, *extra), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]

    fit("whole", "trainer.max_steps=24")
    fit("stopped", "trainer.max_steps=12")
    last = torch.load(runs["stopped"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert (last["global_step"], last["epoch"]) == (12, 1)
    assert last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 2
    fit("resumed", "trainer.max_steps=24", f"ckpt_path={runs['stopped'] / 'checkpoints' / 'last.ckpt'}")
    assert json.loads((runs["resumed"] / "results.json").read_text())["global_step"] == 24
    assert final_val_loss(runs["resumed"]) == pytest.approx(final_val_loss(runs["whole"]), abs=1e-5)
