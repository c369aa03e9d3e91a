"""gpt2lab's GPT-2 as a Hugging Face directory: ``transformers.AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it (``GPT2LMHeadModel``, weights in ``model.safetensors``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from gpt2lab.exporters.directory import write_tokenizer
from gpt2lab.exporters.validation import check_close
from gpt2lab.hf import to_transformers
from gpt2lab.model import GPT2Model
from gpt2lab.tokenizers import EOS_TOKEN, PAD_TOKEN

if TYPE_CHECKING:
    from gpt2lab.tokenizers.chat_template import ChatTemplate


class HFExporter:
    """``export(model, output_path, tokenizer, chat_template=None)`` writes the directory and returns
    ``output_path``, ``file_size_mb`` (the weights) and ``max_abs_diff``: the reloaded model's logits against
    gpt2lab's on random tokens, which must be within ``tolerance``. A chat model's ``generate`` stops at its
    end-of-turn token, as ``gpt2lab.chat`` does; another's at end-of-text. ``generate`` without a length (and
    ``pipeline("text-generation")`` with its defaults) stops at the context length."""

    def __init__(self, validate: bool = True, tolerance: float = 1e-4) -> None:
        self.validate, self.tolerance = validate, tolerance

    def export(
        self,
        model: GPT2Model,
        output_path: str | Path,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        directory = Path(output_path)
        hf = to_transformers(model.float().eval())
        tokens = {"bos": EOS_TOKEN, "eos": chat_template.end if chat_template else EOS_TOKEN, "pad": PAD_TOKEN}
        ids = {name: tokenizer.token_to_id(token) for name, token in tokens.items()}
        for config in (hf.config, hf.generation_config):
            config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["bos"], ids["eos"], ids["pad"]
        # A total length, which transformers' text-generation pipeline honours in place of its default of 256 new
        # tokens (past a small model's positions: an IndexError in wpe); an explicit max_new_tokens still wins.
        hf.generation_config.max_length = model.config.context_length
        with quiet_transformers():
            hf.save_pretrained(str(directory))  # safetensors
            write_tokenizer(tokenizer, model.config.context_length, directory, chat_template)
            weights = directory / "model.safetensors"
            result = {"output_path": str(directory), "file_size_mb": round(weights.stat().st_size / 2**20, 2)}
            result["max_abs_diff"] = self._validate(model, directory) if self.validate else None
        return result

    def _validate(self, model: GPT2Model, directory: Path) -> float:
        """Reload the directory as a user would and compare its logits with gpt2lab's."""
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (2, min(16, model.config.context_length)), generator=generator)
        with torch.no_grad():
            diff = (loaded(ids).logits - model(ids.to(model.wte.weight.device))[0].cpu()).abs().max().item()
        check_close(diff, self.tolerance, "the Hugging Face export (loaded by AutoModelForCausalLM)")
        return diff


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Without transformers' progress bars for writing and reading one small file each."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
