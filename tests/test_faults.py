"""Faults while training: a checkpoint that cannot be written stops the run with the place and the free space,
and leaves the checkpoints already written intact; SIGTERM and Ctrl-C stop at a step with last.ckpt written, and
the same command with ckpt_path=auto finishes the run as if it had never stopped."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_cli
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import model_checkpoint

from gpt2lab.checkpoint import best_checkpoint


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last_one(
    train_cli, tmp_path, corpus_file, cache_dir, monkeypatch
):
    written = []
    save = TorchCheckpointIO.save_checkpoint

    def full_disk_after_the_first_validation(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] > 4:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:626] . unexpected pos 128 vs 64: file write failed"
            )
        written.append(path)
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_disk_after_the_first_validation)
    run = tmp_path / "run"
    args = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}"]
    result = train_cli(*args, cwd=tmp_path)
    assert result.returncode == 1
    error = result.stderr[result.stderr.index("Error: could not write the checkpoint") :]
    assert "file write failed" in error and f"{run / 'checkpoints'} has " in error and "GiB free of" in error
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in error
    assert "Traceback" not in result.stderr
    assert written  # the step-4 checkpoints were written; what is there is whole and loadable
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not list((run / "checkpoints").glob(".*.tmp"))


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_at_a_step_with_last_ckpt_and_ckpt_path_auto_finishes_the_run(
    train_cli, tmp_path, corpus_file, cache_dir, name, status
):
    common = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "trainer.max_steps=12", "sample=null"]
    whole = tmp_path / "whole"
    assert train_cli(*common, f"hydra.run.dir={whole}", cwd=tmp_path).returncode == 0
    run = tmp_path / "run"
    # Sent once step 5 has been checked for signals: the run ends at the next step boundary, after step 6.
    stop = ["+callbacks.stop._target_=helpers.SignalAtStep", "+callbacks.stop.step=5", f"+callbacks.stop.signal={name}"]
    stopped = train_cli(*common, f"hydra.run.dir={run}", "ckpt_path=auto", *stop, cwd=tmp_path)
    assert stopped.returncode == status, stopped.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert f"Stopped by {name} at step 6, with {last} written" in stopped.stdout + stopped.stderr
    assert torch.load(last, weights_only=False)["global_step"] == 6  # mid-way between the validations at 4 and 8
    assert not (run / "results.json").exists()
    finished = train_cli(*common, f"hydra.run.dir={run}", "ckpt_path=auto", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"Resuming from {last}" in (run / "train.log").read_text()
    assert json.loads((run / "results.json").read_text())["metrics"]["val/loss"] == pytest.approx(
        json.loads((whole / "results.json").read_text())["metrics"]["val/loss"], abs=1e-6
    )
    val_steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open()) if r["val/loss"]]
    assert val_steps == [int(r["step"]) for r in csv.DictReader((whole / "metrics.csv").open()) if r["val/loss"]]


@pytest.mark.slow
def test_sigterm_under_ddp_stops_both_ranks_at_one_step_and_ckpt_path_auto_finishes(tmp_path, corpus_file, cache_dir):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    common = [
        *TINY,
        f"data.path={corpus_file}",
        f"paths.cache_dir={cache_dir}",
        "trainer.max_steps=12",
        "sample=null",
        *ddp,
    ]
    assert run_cli(*common, "hydra.run.dir=whole", cwd=tmp_path, timeout=600).returncode == 0
    stop = ["+callbacks.stop._target_=helpers.SignalAtStep", "+callbacks.stop.step=5"]  # SIGTERM on each rank
    stopped = run_cli(*common, "hydra.run.dir=run", "ckpt_path=auto", *stop, cwd=tmp_path, timeout=600)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    finished = run_cli(*common, "hydra.run.dir=run", "ckpt_path=auto", cwd=tmp_path, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    loss = [json.loads((tmp_path / d / "results.json").read_text())["metrics"]["val/loss"] for d in ("run", "whole")]
    assert loss[0] == pytest.approx(loss[1], abs=1e-5)


def test_sigusr1_under_slurm_stops_with_last_ckpt_and_requeues_the_job(train_cli, tmp_path, corpus_file, cache_dir):
    # A SLURM job as Lightning sees one, and an scontrol that records how it was called
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "gpt2", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1"}
    slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    env = {**slurm, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    common = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "trainer.max_steps=12", "sample=null"]
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    warn = ["+callbacks.stop._target_=helpers.SignalAtStep", "+callbacks.stop.signal=SIGUSR1"]
    # callbacks.preemption.requeue=false: the signal only stops the run
    once = [*common, f"hydra.run.dir={run}", "ckpt_path=auto", *warn, "+callbacks.stop.step=2"]
    stopped = train_cli(*once, "callbacks.preemption.requeue=false", cwd=tmp_path, env=env)
    assert stopped.returncode == 138 and not calls.exists(), stopped.stderr[-3000:]
    assert torch.load(last, weights_only=False)["global_step"] == 3

    lightning_log = logging.getLogger("pytorch_lightning")  # Lightning's own lines, whatever handler prints them
    lightning_records: list[logging.LogRecord] = []
    catch = logging.Handler()
    catch.emit = lightning_records.append
    lightning_log.addHandler(catch)
    try:
        stopped = train_cli(
            *common, f"hydra.run.dir={run}", "ckpt_path=auto", *warn, "+callbacks.stop.step=5", cwd=tmp_path, env=env
        )
    finally:
        lightning_log.removeHandler(catch)
    # the stop writes the full state to resume from, and says only that
    assert not [r for r in lightning_records if "weights_only" in r.getMessage()]
    assert stopped.returncode == 138, stopped.stderr[-3000:]
    assert calls.read_text() == "requeue 4242\n"
    output = stopped.stdout + stopped.stderr
    assert f"Stopped by SIGUSR1 at step 6, with {last} written" in output and "Requeued SLURM job 4242" in output
    assert torch.load(last, weights_only=False)["global_step"] == 6
    assert not list(tmp_path.glob("**/hpc_ckpt_*.ckpt"))  # Lightning's own SLURM checkpoint stays unwritten
    # The requeued job: the same command, same job id, same run directory
    finished = train_cli(*common, f"hydra.run.dir={run}", "ckpt_path=auto", cwd=tmp_path, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"Resuming from {last}" in (run / "train.log").read_text()
    assert json.loads((run / "results.json").read_text())["global_step"] == 12
    assert calls.read_text() == "requeue 4242\n"  # a run that ends is not requeued


def test_the_time_checkpoint_writes_last_ckpt_between_validations_at_optimizer_steps(
    train_cli, tmp_path, corpus_file, cache_dir, monkeypatch
):
    saves = []
    save = TorchCheckpointIO.save_checkpoint

    def record(self, checkpoint, path, storage_options=None):
        batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
        saves.append((checkpoint["global_step"], batches, path.name))
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", record)
    # ModelCheckpoint's clock, one second further at each reading: Lightning's reads it at every micro-batch, this
    # one after each optimizer step (model_checkpoint, which reads it too, is left out)
    clock = itertools.count()
    monkeypatch.setattr(model_checkpoint, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    common = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "sample=null", "test=false"]
    common += ["validate_at_start=false", "callbacks.time_checkpoint.train_time_interval.minutes=0.05"]  # 3 s
    # Two micro-batches per optimizer step, and no validation before the last step's: last.ckpt every 3 "seconds",
    # at the end of an optimizer step, never between the two micro-batches of one (its gradients are not saved)
    run = tmp_path / "run"
    args = ["trainer.max_steps=7", "trainer.val_check_interval=100", "trainer.accumulate_grad_batches=2"]
    args += ["~callbacks.model_checkpoint"]
    assert train_cli(*common, *args, f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    assert len([r for r in csv.DictReader((run / "metrics.csv").open()) if r["val/loss"]]) == 1  # the last step's
    assert saves == [(3, 6, ".last.ckpt.tmp"), (6, 12, ".last.ckpt.tmp")]  # (step, micro-batches, file)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    monkeypatch.undo()

    # Beside validation (at steps 4 and 6): the best checkpoints are still model_checkpoint's, by val/loss, and
    # there is one last.ckpt, the newest (with a version counter the second writer would add last-v1.ckpt)
    run = tmp_path / "validated"
    assert train_cli(*common, "trainer.max_steps=6", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files[0] == "last.ckpt" and [f[:19] for f in files[1:]] == ["step000004-val_loss", "step000006-val_loss"]
    best = Path(json.loads((run / "results.json").read_text())["best_checkpoint"])
    assert best.name == min(files[1:], key=lambda f: float(f[19:-5])) and best_checkpoint(run) == best
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
