"""Resuming refuses a checkpoint whose run trained on another tokenizer, other data or another batch layout, with
the keys that differ, unless resume.strict=false; the same settings resume, and so do checkpoints written before
the settings were recorded."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY

FAST = ["model.vocab_size=384", "validate_at_start=false", "test=false", "sample=null"]  # 384: room for both tokenizers


@pytest.fixture
def checkpoint(train_cli, tmp_path, corpus_file, cache_dir):
    """A 4-step run's last.ckpt, and the overrides it was trained with."""
    common = [*TINY, *FAST, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}"]
    trained = train_cli(*common, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return tmp_path / "first" / "checkpoints" / "last.ckpt", common


def test_a_checkpoint_of_another_tokenizer_data_or_batch_layout_is_refused_naming_the_keys(
    train_cli, tmp_path, checkpoint, corpus_file
):
    last, common = checkpoint
    moved = tmp_path / "elsewhere.txt"  # the same text at another path: only data.path differs
    moved.write_text(corpus_file.read_text())
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    cases = {
        "tokenizer.vocab_size: checkpoint 320 vs now 300": ["tokenizer.vocab_size=300"],
        f"data.path: checkpoint {corpus_file} vs now {moved}": [f"data.path={moved}"],
        "data.max_length: checkpoint 32 vs now 16": ["data.max_length=16"],
        "data.batch_size: checkpoint 8 vs now 4": ["data.batch_size=4"],
        "trainer.accumulate_grad_batches: checkpoint 1 vs now 2": ["trainer.accumulate_grad_batches=2"],
        "world size (trainer.devices x trainer.num_nodes): checkpoint 1 vs now 2": ddp,
    }
    for i, (named, overrides) in enumerate(cases.items()):
        run = tmp_path / f"refused{i}"
        result = train_cli(*common, *overrides, f"ckpt_path={last}", f"hydra.run.dir={run}", cwd=tmp_path)
        assert result.returncode == 1, (named, result.stderr[-3000:])
        error = result.stderr[result.stderr.index("Error: ") :]
        assert f"ckpt_path={str(last)!r} was written by a run with other settings ({named})" in error, error
        assert "resume.strict=false" in error and not (run / "checkpoints").exists()


def test_resume_strict_false_warns_and_goes_on_and_the_same_settings_resume(train_cli, tmp_path, checkpoint):
    last, common = checkpoint
    changed = train_cli(
        *common, "data.batch_size=4", "resume.strict=false", "trainer.max_steps=6", f"ckpt_path={last}",
        f"hydra.run.dir={tmp_path / 'changed'}", cwd=tmp_path,
    )  # fmt: skip
    assert changed.returncode == 0, changed.stderr[-3000:]
    warning = f"resume.strict=false: resuming from {last}, whose run had other settings (data.batch_size: checkpoint 8"
    assert warning in (tmp_path / "changed" / "train.log").read_text()
    assert json.loads((tmp_path / "changed" / "results.json").read_text())["global_step"] == 6

    same = train_cli(
        *common, "trainer.max_steps=6", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'same'}", cwd=tmp_path
    )
    assert same.returncode == 0, same.stderr[-3000:]
    assert "other settings" not in (tmp_path / "same" / "train.log").read_text()


def test_a_checkpoint_written_before_settings_were_recorded_resumes_and_its_tokenizer_is_still_compared(
    train_cli, tmp_path, checkpoint
):
    last, common = checkpoint
    old = torch.load(last, weights_only=True)
    del old["callbacks"]["RunSettings"]  # as checkpoints written before this check were
    torch.save(old, last)
    resumed = train_cli(
        *common, "data.batch_size=4", "trainer.max_steps=6", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'old'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "predates recorded run settings" in (tmp_path / "old" / "train.log").read_text()
    refused = train_cli(*common, "tokenizer.vocab_size=300", f"ckpt_path={last}", "hydra.run.dir=new", cwd=tmp_path)
    assert refused.returncode == 1
    assert "other settings (tokenizer: checkpoint a tokenizer of 320 tokens (sha256 " in refused.stderr


def test_ckpt_path_auto_in_a_run_directory_named_by_the_clock_is_refused_with_the_fix(train_cli, tmp_path, cache_dir):
    """The same command run again would get a new outputs/<date>/<time> and silently start from scratch."""
    result = train_cli(*TINY, *FAST, "ckpt_path=auto", f"paths.cache_dir={cache_dir}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    error = result.stderr[result.stderr.index("Error: ") :]
    assert "ckpt_path=auto" in error and "hydra.run.dir=outputs/<name> ckpt_path=auto" in error, error
    assert "ckpt_path=last" in error and not list(tmp_path.glob("outputs/**/checkpoints"))
