"""What every export directory holds besides its format's own files: the tokenizer (as ``transformers`` saves a
``PreTrainedTokenizerFast``, so that ``AutoTokenizer`` loads it), ``config.json`` and the weights in
safetensors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT2Model
from gpt2lab.tokenizers import EOS_TOKEN, PAD_TOKEN, UNK_TOKEN

if TYPE_CHECKING:  # the data formats import datasets, which an export does not need
    from gpt2lab.tokenizers.chat_template import ChatTemplate


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """``path``, refused if it exists unless ``overwrite`` (the caller replaces it once the new export is done)."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise ConfigError(f"output_dir={str(path)!r} exists: choose a new directory, or overwrite=true to replace it")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir={str(path)!r} is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_tokenizer(
    tokenizer: Tokenizer, context_length: int, directory: Path, chat_template: ChatTemplate | None = None
) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json``, with gpt2lab's special tokens named (end of text also
    as the beginning, as GPT-2's tokenizer does), padding on the left (batched generation continues each prompt
    from its last token; transformers warns about right padding in a decoder) and, for a model trained with
    ``data.format=chat``, its template as a Jinja ``chat_template`` and its end-of-turn token as ``eos_token``:
    where a reply ends, and where ``generate`` stops."""
    from transformers import PreTrainedTokenizerFast

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN}
    if chat_template is not None:
        special["eos_token"] = chat_template.end
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=context_length,
        padding_side="left",
        **{role: token for role, token in special.items() if token in vocab},
    )
    fast.save_pretrained(str(directory))
    # transformers 5 writes its new class name, TokenizersBackend, which transformers 4 does not know; both load
    # PreTrainedTokenizerFast (in 5, another name of the same class). The chat template goes in the config, where
    # every transformers since 4.x reads it (5 would write it to chat_template.jinja, which 4.45 does not read).
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["padding_side"] = "left"
    if chat_template is not None:
        config["chat_template"] = chat_template.jinja()
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def gpt2lab_config(model: GPT2Model) -> dict[str, Any]:
    """The model's ``GPT2Config`` as a dict: ``GPT2Model(GPT2Config(**it))`` rebuilds the architecture."""
    return dataclasses.asdict(model.config)


def write_weights(model: GPT2Model, directory: Path, extra: dict[str, Any]) -> None:
    """``model.safetensors`` (gpt2lab's own parameter names; the tied output layer stored once) and
    ``config.json``: ``{"model_type": "gpt2lab", "gpt2lab": <GPT2Config>, **extra}``."""
    from safetensors.torch import save_model

    save_model(model, str(directory / "model.safetensors"))
    config = {"model_type": "gpt2lab", "gpt2lab": gpt2lab_config(model), **extra}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_weights(directory: str | Path) -> GPT2Model:
    """The model a ``write_weights`` directory holds."""
    from safetensors.torch import load_model

    from gpt2lab.model import GPT2Config

    config = json.loads((Path(directory) / "config.json").read_text())
    model = GPT2Model(GPT2Config(**config["gpt2lab"]))
    load_model(model, str(Path(directory) / "model.safetensors"))
    return model.eval()
