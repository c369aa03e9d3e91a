"""Finding, checking and loading gpt2lab checkpoints (Lightning ``.ckpt`` files)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from gpt2lab.errors import ConfigError
from gpt2lab.lit.module import CHECKPOINT_KEY
from gpt2lab.model import GPT2Config, GPT2Model


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str | os.PathLike, exclude: Path | None = None) -> str | None:
    """``None``, an existing file, or ``last``: the newest ``last.ckpt`` of the runs under ``log_dir``."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        candidates = [
            p for p in Path(log_dir).glob("**/checkpoints/last.ckpt") if exclude is None or exclude not in p.parents
        ]
        if not candidates:
            raise ConfigError(f"ckpt_path=last: no run under {log_dir}/ has a checkpoints/last.ckpt to resume from")
        return str(max(candidates, key=lambda p: p.stat().st_mtime))
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path!r}: no such file (use a .ckpt file under <run>/checkpoints/, or ckpt_path=last)"
        )
    return str(path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint onto the CPU, or fail with a message that says what is wrong with the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as e:
        raise ConfigError(f"ckpt_path={str(path)!r} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "model" not in checkpoint.get("hyper_parameters", {})
    ):
        raise ConfigError(
            f"ckpt_path={str(path)!r} is not a gpt2lab checkpoint (no state_dict or model hyper-parameters)"
        )
    return checkpoint


def check_resumable(path: str | os.PathLike, model: dict[str, Any]) -> None:
    """Resuming needs the same architecture; name the keys that differ instead of a shape error."""
    saved = read_checkpoint(path)["hyper_parameters"]["model"]
    ignore = {"gradient_checkpointing", "dropout", "attention_dropout", "residual_dropout"}
    diff = {k: (saved.get(k), v) for k, v in model.items() if k not in ignore and saved.get(k) != v}
    if diff:
        changes = ", ".join(f"model.{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"ckpt_path={str(path)!r} holds a different model ({changes}); resume with the run's own config"
        )


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT2Model, Tokenizer | None]:
    """Rebuild the trained model and its tokenizer from a checkpoint alone."""
    checkpoint = read_checkpoint(path)
    model = GPT2Model(GPT2Config(**checkpoint["hyper_parameters"]["model"]))
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    tokenizer_json = checkpoint.get(CHECKPOINT_KEY, {}).get("tokenizer")
    tokenizer = Tokenizer.from_str(tokenizer_json) if tokenizer_json else None
    return model.to(device).eval(), tokenizer
