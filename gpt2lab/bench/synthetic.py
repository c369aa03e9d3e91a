"""A checkpoint to measure with where no trained one is at hand (a GPU host with no data and no network): a model of
a named size (``conf/model/<name>.yaml``) with random weights, and a byte-level BPE tokenizer trained on Python's
standard library. It is a gpt2lab checkpoint like any other: ``gpt2lab serve``, ``generate`` and ``evaluate`` load
it. Its text is noise, and its speed is the trained model's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gpt2lab.bench.decode import build_model
from gpt2lab.checkpoint import Payload, write_payload
from gpt2lab.data.pystdlib import pystdlib_documents
from gpt2lab.tokenizers.build import train_bpe


def synthetic_checkpoint(name: str, path: Path, seed: int = 0) -> Path:
    """Write ``path`` (a ``.ckpt``): model size ``name``, random weights from ``seed``, a tokenizer of the model's
    vocabulary trained on the standard library (or as many tokens as that text gives)."""
    torch.manual_seed(seed)
    model = build_model(name, torch.device("cpu"), torch.float32)
    _, texts = pystdlib_documents()
    tokenizer = train_bpe(texts, model.config.vocab_size, show_progress=False)
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": dataclasses.asdict(model.config)},
    }
    write_payload(checkpoint, Payload(tokenizer))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path
