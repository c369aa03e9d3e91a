"""Faults while training: a checkpoint that cannot be written stops the run with the place and the free space,
and leaves the checkpoints already written intact."""

from __future__ import annotations

import torch
from conftest import TINY
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last_one(
    train_cli, tmp_path, corpus_file, cache_dir, monkeypatch
):
    written = []
    save = TorchCheckpointIO.save_checkpoint

    def full_disk_after_the_first_validation(self, checkpoint, path, storage_options=None):
        if checkpoint["global_step"] > 4:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 128 vs 64: file write failed")
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
