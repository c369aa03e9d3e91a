"""The text generator: a trained model and its tokenizer continuing prompts, decoded together, left-padded, with the
KV cache of ``gpt2lab/model/generation.py``. ``complete`` is the decoding loop of the ``generate`` command, the chat
session and the end-of-training sample; ``Completions`` the text of each row as its tokens arrive (stop strings,
end-of-text, streaming), shared with the ONNX generator (``gpt2lab.inference.onnx``). Nothing here imports torch at
import time: the ONNX generator builds on it where PyTorch is not installed.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from tokenizers import Tokenizer

from gpt2lab.errors import ConfigError
from gpt2lab.tokenizers import EOS_TOKEN

if TYPE_CHECKING:  # torch is imported where a checkpoint is used
    from gpt2lab.model import GPT2Model

PROMPTS_PER_BATCH = 16


def check_inference(settings: Mapping[str, Any]) -> None:
    """Decoding settings in range, naming the key (``inference.*``)."""
    checks = (
        ("max_new_tokens", lambda v: v >= 1, "at least 1"),
        ("num_return_sequences", lambda v: v >= 1, "at least 1"),
        ("top_k", lambda v: v is None or v >= 1, "at least 1, or null for no limit"),
        ("top_p", lambda v: v is None or 0 < v <= 1, "in (0, 1] (1: no nucleus cut)"),
        ("repetition_penalty", lambda v: v > 0, "positive (1.0: no penalty)"),
    )
    for key, ok, expected in checks:
        if key in settings and settings[key] is not None and not isinstance(settings[key], (int, float)):
            raise ConfigError(f"inference.{key}={settings[key]!r}: expected a number")
        if key in settings and not ok(settings[key]):
            raise ConfigError(f"inference.{key}={settings[key]}: expected {expected}")
    stop = settings.get("stop")
    if not (
        stop is None or isinstance(stop, str) or (isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop))
    ):
        raise ConfigError(f"inference.stop={stop!r}: expected a string or a list of strings, e.g. '\\n\\n'")
    if settings.get("do_sample", True) and not settings.get("temperature", 1.0) > 0:
        raise ConfigError(
            f"inference.temperature={settings.get('temperature')}: expected > 0 when sampling "
            "(inference.do_sample=false decodes greedily)"
        )


def stop_strings(settings: Mapping[str, Any]) -> list[str]:
    """``inference.stop`` as a list: one string is one stop string (``inference.stop='\\n'``), as one tag is
    one tag; ``\\n`` and ``\\t`` typed on a command line are a newline and a tab."""
    stop = settings.get("stop") or []
    return [s.replace("\\n", "\n").replace("\\t", "\t") for s in ([stop] if isinstance(stop, str) else stop) if s]


def usable_device(device: str) -> str:
    """``device`` (``auto``: the GPU if there is one, else the CPU), checked: a device torch cannot use fails here,
    by name, not in the middle of loading the weights."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(
            f"device={device!r} cannot be used here ({str(e).splitlines()[0][:120]}): "
            "use device=auto (the GPU if there is one, else the CPU), cpu, or cuda:N"
        ) from None
    return device


class TextGenerator:
    """A trained model and its tokenizer, ready to continue text. ``model_path`` is what ``ckpt=`` takes:
    a ``.ckpt`` file, a run directory (its best checkpoint), ``last`` or ``best`` (of ``log_dir``)."""

    def __init__(self, model_path: str, device: str = "auto", log_dir: str = "outputs") -> None:
        from gpt2lab.checkpoint import find_checkpoint, load_checkpoint

        device = usable_device(device)
        self.path = find_checkpoint(model_path, log_dir)
        model, tokenizer = load_checkpoint(self.path, device=device)
        if tokenizer is None:
            raise ConfigError(f"ckpt={str(self.path)!r} carries no tokenizer, so prompts cannot be encoded")
        self.model, self.tokenizer = model, tokenizer

    def generate_text(
        self, prompt: str | list[str], config: Mapping[str, Any], out: TextIO | None = sys.stdout
    ) -> list[str]:
        """Completions of ``prompt`` (``num_return_sequences`` per prompt, in order). A single sequence
        streams to ``out`` as it is produced when ``config['stream']``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        completions = []
        for start in range(0, len(prompts), PROMPTS_PER_BATCH):
            batch = prompts[start : start + PROMPTS_PER_BATCH]
            completions += self.complete(batch, config, out=out)
        return completions

    def complete(self, prompts: list[str], config: Mapping[str, Any], out: TextIO | None = None) -> list[str]:
        """One batch of ``generate_text``."""
        return complete(self.model, self.tokenizer, prompts, config, out=out)


def complete(
    model: GPT2Model,
    tokenizer: Tokenizer,
    prompts: list[str] | list[list[int]],
    config: Mapping[str, Any],
    out: TextIO | None = None,
    end_token: int | None = None,
) -> list[str]:
    """Continue each prompt (text, or token ids already encoded), ``num_return_sequences`` times; a completion ends
    at ``end_token`` (by default
    end-of-text; a chat template's end-of-turn in ``gpt2lab.chat``), at one of the ``stop`` strings (which it then
    ends before), or after ``max_new_tokens``."""
    import torch

    from gpt2lab.model.generation import eager_decoding

    settings = dict(config)
    device = model.wte.weight.device
    input_ids, mask = (torch.tensor(rows, device=device) for rows in left_padded(tokenizer, prompts, settings))
    n = settings.get("num_return_sequences", 1)
    completions = Completions(tokenizer, len(prompts) * n, settings, out)
    if end_token is not None:
        completions.eos = end_token
    with eager_decoding():  # a model compiled for training would compile again for every decoding shape
        tokens = model.generate_stream(
            input_ids, settings["max_new_tokens"], settings.get("temperature", 1.0), settings.get("top_k"),
            top_p=settings.get("top_p"), repetition_penalty=settings.get("repetition_penalty", 1.0),
            do_sample=settings.get("do_sample", True), attention_mask=mask, eos_token_id=completions.eos,
            num_return_sequences=n, seed=settings.get("seed"),
        )  # fmt: skip
        for step in tokens:
            if completions.add(step.tolist()):
                break
    return completions.finish()


def left_padded(
    tokenizer: Tokenizer, prompts: list[str] | list[list[int]], settings: Mapping[str, Any]
) -> tuple[list[list[int]], list[list[int]]]:
    """The prompts' token ids (a prompt given as ids is taken as it is) and attention mask, (B, T) as lists,
    left-padded with 0: every prompt ends where decoding starts. Checks the decoding ``settings`` first."""
    check_inference(settings)
    if any(not p for p in prompts):
        raise ConfigError("the prompt is empty: give the model some text to continue (prompt=... or prompts_file=...)")
    encoded = [p if isinstance(p, list) else tokenizer.encode(p).ids for p in prompts]
    width = max(len(ids) for ids in encoded)
    return [[0] * (width - len(ids)) + ids for ids in encoded], [
        [0] * (width - len(ids)) + [1] * len(ids) for ids in encoded
    ]


class Completions:
    """The text of each row as its new tokens arrive, step by step (``add``): a row ends at end-of-text, or
    before one of the ``stop`` strings of ``settings``; a single row streams to ``out``."""

    def __init__(self, tokenizer: Tokenizer, rows: int, settings: Mapping[str, Any], out: TextIO | None) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.eos = tokenizer.token_to_id(EOS_TOKEN)
        self.stops = stop_strings(settings)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.texts, self.done = [""] * rows, [False] * rows
        self.streaming = out is not None and settings.get("stream", True) and rows == 1
        self.shown = 0

    def add(self, step: list[int]) -> bool:
        """Take one new token per row; True once every row has ended."""
        for row, token in enumerate(step):
            if self.done[row]:
                continue
            if token == self.eos:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row])
            hit = min((text.find(s) for s in self.stops if s in text), default=-1)
            self.texts[row], self.done[row] = (text[:hit], True) if hit >= 0 else (text, False)
        if self.streaming and not self.texts[0].endswith("\ufffd"):  # not in the middle of a multi-byte character
            self.out.write(self.texts[0][self.shown :])
            self.out.flush()
            self.shown = len(self.texts[0])
        return all(self.done)

    def finish(self) -> list[str]:
        if self.streaming:
            self.out.write(self.texts[0][self.shown :] + "\n")
        return self.texts


def sample_text(
    model: GPT2Model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None
) -> str:
    """The prompt and a short sampled continuation (seed 0): the sample printed at the end of training."""
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": 0}
    return prompt + complete(model, tokenizer, [prompt or EOS_TOKEN], settings)[0]
