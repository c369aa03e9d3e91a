"""gpt2lab/checkpoint.py: the payload gpt2lab adds to Lightning's checkpoints, and files that are not whole."""

from __future__ import annotations

import shutil

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from gpt2lab.checkpoint import Payload, best_checkpoint, read_checkpoint, read_payload, write_payload
from gpt2lab.errors import ConfigError


def test_the_payload_travels_with_the_checkpoint(tmp_path):
    """What the LightningModule writes is what loading reads back: the tokenizer, the chat template and the RNG
    states (so a resumed run draws what the first would have)."""
    tokenizer = Tokenizer(WordLevel({"<|endoftext|>": 0, "def": 1}, unk_token="<|endoftext|>"))
    template = {"roles": ["user", "assistant"], "end": "<|end|>"}
    checkpoint: dict = {"state_dict": {}, "hyper_parameters": {"model": {}}}
    write_payload(checkpoint, Payload(tokenizer, template))
    expected = torch.rand(3)
    torch.save(checkpoint, tmp_path / "run.ckpt")

    payload = read_payload(read_checkpoint(tmp_path / "run.ckpt"))
    assert payload.tokenizer.to_str() == tokenizer.to_str() and payload.chat_template == template
    torch.set_rng_state(payload.rng["torch"])
    assert torch.equal(torch.rand(3), expected)
    assert read_payload({}) == Payload()  # a checkpoint written without one


def test_a_truncated_checkpoint_is_named_so_with_its_size(tmp_path):
    """Issue 27 #16: a checkpoint cut short was "not a file written by torch.save"."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {"model": {}}}, path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match=rf"last.ckpt' is truncated or damaged: .* after {len(whole) // 2:,} bytes"):
        read_checkpoint(path)
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="notes.ckpt' is not a checkpoint: not a file written by torch.save"):
        read_checkpoint(tmp_path / "notes.ckpt")


def test_a_copied_run_directory_gives_its_own_best_checkpoint(trained_run, tmp_path):
    """Its last.ckpt still names the original run's best file by absolute path: the copy's own file wins, so that a
    copy that was changed (fine-tuned, averaged, ...) is the one evaluated."""
    copy = shutil.copytree(trained_run, tmp_path / "copy")
    assert best_checkpoint(trained_run).parent == trained_run / "checkpoints"
    assert best_checkpoint(copy) == copy / "checkpoints" / best_checkpoint(trained_run).name
