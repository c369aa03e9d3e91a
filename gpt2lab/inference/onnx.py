"""Text generation with an exported ONNX decoder and onnxruntime: numpy, onnxruntime and tokenizers only.

This module never imports torch (nor anything of gpt2lab that does), so that an ONNX export runs where
PyTorch is not installed: ``python -m gpt2lab.generate onnx=<export dir> prompt=...``.

The graph (``gpt2lab/exporters/onnx.py``) takes ``input_ids`` and ``position_ids`` (B, T), an
``attention_mask`` (B, past + T) and each layer's ``past_key_values.<i>.key`` / ``.value`` (B, heads, past,
head_dim); it returns ``logits`` (B, T, V) and the ``present.<i>.*`` keys and values (B, heads, past + T,
head_dim). The prompt is read with a past of length 0, each new token with the presents of the step
before. Decoding follows ``gpt2lab/model/generation.py``: left padding, positions counted from each row's
first real token, the repetition penalty, temperature, top-k and top-p in that order, and a window that
slides by half the context past the end of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from tokenizers import Tokenizer

from gpt2lab.errors import ConfigError
from gpt2lab.inference.generator import Completions, TextGenerator, left_padded


class ONNXDecoder:
    """An exported decoder graph in an onnxruntime session: ``prefill`` reads a prompt, ``step`` one token per
    row; both return the (B, V) float32 logits of each row's next token and keep the keys and values."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        graph: Mapping[str, int],
        context_length: int,
        providers: list[str] | None = None,
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: one per core
        providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.graph, self.context_length = graph, context_length  # num_layers, num_heads, head_dim
        self.past: dict[str, np.ndarray] = {}
        self.mask = np.zeros((0, 0), np.int64)
        self.next_position = np.zeros(0, np.int64)

    @classmethod
    def from_directory(cls, export_dir: str | os.PathLike, **options: Any) -> ONNXDecoder:
        """The graph of an export directory (``config.json`` says which file, and its shapes)."""
        config = json.loads((Path(export_dir) / "config.json").read_text())
        graph, context_length = config["onnx"], config["gpt2lab"]["context_length"]
        return cls(Path(export_dir) / graph["file"], graph, context_length, **options)

    def _empty_past(self, batch_size: int) -> dict[str, np.ndarray]:
        g = self.graph
        shape = (batch_size, g["num_heads"], 0, g["head_dim"])
        return {
            f"past_key_values.{i}.{kv}": np.zeros(shape, np.float32)
            for i in range(g["num_layers"])
            for kv in ("key", "value")
        }

    def _run(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": self.mask, "position_ids": positions, **self.past}
        logits, *presents = self.session.run(None, feeds)
        self.past = {
            name.replace("present", "past_key_values"): v for name, v in zip(self.outputs[1:], presents, strict=False)
        }
        return logits[:, -1, :].astype(np.float32)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Forget what was read and read (B, T) ``input_ids``, left-padded where ``attention_mask`` is 0."""
        self.past = self._empty_past(input_ids.shape[0])
        self.mask = attention_mask.astype(np.int64)
        positions = np.maximum(self.mask.cumsum(1) - 1, 0)  # each row counts from its first real token
        self.next_position = self.mask.sum(1)
        return self._run(input_ids.astype(np.int64), positions)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Read one new token per row, (B,)."""
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], 1)
        positions = self.next_position[:, None].copy()
        self.next_position = self.next_position + 1
        return self._run(tokens[:, None].astype(np.int64), positions)

    @property
    def length(self) -> int:
        """Positions read so far (the same for every row)."""
        return self.mask.shape[1]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def filter_logits(
    logits: np.ndarray,
    temperature: float | np.ndarray = 1.0,
    top_k: int | None = None,
    top_p: float | np.ndarray | None = None,
) -> np.ndarray:
    """``gpt2lab.model.generation.filter_logits`` in numpy: temperature, then top-k, then the top-p nucleus."""
    if np.any(temperature != 1.0):  # a float, or (B, 1): one per row
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and np.any(top_p < 1.0):
        order = np.argsort(-logits, axis=-1, kind="stable")
        probs = softmax(np.take_along_axis(logits, order, -1))
        outside_sorted = probs.cumsum(-1) - probs > top_p  # the tokens after the nucleus (the first one stays)
        outside = np.zeros_like(outside_sorted)
        np.put_along_axis(outside, order, outside_sorted, -1)
        logits = np.where(outside, -np.inf, logits)
    return logits


def penalize_repetition(
    logits: np.ndarray, history: np.ndarray, history_mask: np.ndarray, penalty: float
) -> np.ndarray:
    """CTRL's repetition penalty, as ``gpt2lab.model.generation.penalize_repetition``."""
    seen = np.zeros(logits.shape, bool)
    rows = np.repeat(np.arange(len(history)), history.shape[1])
    seen[rows[history_mask.ravel()], history.ravel()[history_mask.ravel()]] = True
    return np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)


def stream_tokens(
    decoder: ONNXDecoder,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    do_sample: bool = True,
    eos_token_id: int | None = None,
    seed: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield each step's (B,) new tokens, as ``gpt2lab.model.generation.stream_tokens`` does (greedy decoding
    gives the same tokens; sampling draws from numpy's generator, not torch's)."""
    context = decoder.context_length
    input_ids, attention_mask = input_ids[:, -context:], attention_mask[:, -context:]
    B, T = input_ids.shape
    rng = np.random.default_rng(seed)
    history = np.concatenate([input_ids, np.zeros((B, max_new_tokens), np.int64)], 1)
    history_mask = np.concatenate([attention_mask, np.ones((B, max_new_tokens), np.int64)], 1).astype(bool)
    finished = np.zeros(B, bool)
    next_id = None
    for i in range(max_new_tokens):
        end = T + i
        if next_id is None:
            logits = decoder.prefill(history[:, :end], history_mask[:, :end])
        elif decoder.length + 1 > context:  # past the context: read the last half context again
            start = end - context // 2
            logits = decoder.prefill(history[:, start:end], history_mask[:, start:end])
        else:
            logits = decoder.step(next_id)
        if repetition_penalty != 1.0:
            logits = penalize_repetition(logits, history[:, :end], history_mask[:, :end], repetition_penalty)
        if do_sample:
            probs = softmax(filter_logits(logits, temperature, top_k, top_p).astype(np.float64))
            next_id = np.array([rng.choice(len(p), p=p / p.sum()) for p in probs], np.int64)
        else:
            next_id = logits.argmax(-1)
        if eos_token_id is not None:
            next_id = np.where(finished, eos_token_id, next_id)
            finished |= next_id == eos_token_id
        history[:, end] = next_id
        yield next_id
        if eos_token_id is not None and finished.all():
            return


class ONNXSlots:
    """``gpt2lab.model.generation.DecodeSlots`` over an ONNX decoder: rows that decode independently, a prompt
    joining a free row while the others go on, their keys and values in a ring of the whole context kept here
    and passed to the graph as its past at every step."""

    def __init__(self, decoder: ONNXDecoder, batch_size: int) -> None:
        self.decoder, g, C = decoder, decoder.graph, decoder.context_length
        shape = (batch_size, g["num_heads"], C, g["head_dim"])
        self.ring = {name: np.zeros(shape, np.float32) for name in decoder._empty_past(batch_size)}
        self.valid = np.zeros((batch_size, C), np.int64)
        self.next_position = np.zeros(batch_size, np.int64)
        self.index = 0  # the column the next step writes
        self.free = np.ones(batch_size, bool)
        self.used: set[int] = set()
        self.last = np.zeros(batch_size, np.int64)
        self.logits = np.zeros((batch_size, 0), np.float32)  # as wide as the graph's logits, once it has run

    def admit(self, row: int, prompt: list[int]) -> None:
        d = self.decoder
        logits = d.prefill(np.array([prompt], np.int64), np.ones((1, len(prompt)), np.int64))[0]
        if self.logits.shape[1] != len(logits):
            self.logits = np.zeros((len(self.last), len(logits)), np.float32)
        self.logits[row] = logits
        columns = (self.index - len(prompt) + np.arange(len(prompt))) % self.valid.shape[1]
        for name, past in d.past.items():
            self.ring[name][row][:, columns] = past[0]
        self.valid[row] = 0
        self.valid[row, columns] = 1
        self.next_position[row] = len(prompt)
        self.free[row] = False
        self.used.add(row)

    def release(self, row: int) -> None:
        self.free[row] = True
        self.used.discard(row)

    def step(self) -> None:
        """As ``DecodeSlots.step``: the rows in use (the first 1, 2, 4, ... rows) read their last tokens."""
        if not self.used:
            return
        d, n = self.decoder, min(1 << max(self.used).bit_length(), len(self.last))
        self.next_position[self.free] = 0
        d.past = {name: ring[:n] for name, ring in self.ring.items()}
        d.mask = np.concatenate([self.valid[:n], np.ones((n, 1), np.int64)], 1)
        self.logits[:n] = d._run(self.last[:n, None], self.next_position[:n, None].copy())
        for name, present in d.past.items():  # (n, heads, C + 1, head_dim): the new column is the last
            self.ring[name][:n, :, self.index] = present[:, :, -1]
        self.valid[:n, self.index] = 1
        self.next_position[:n] += 1
        self.index = (self.index + 1) % self.valid.shape[1]

    def sample(
        self, rows: list[int], temperature: list[float], top_p: list[float], generators: list, top_k: int | None
    ) -> list[int]:
        """As ``DecodeSlots.sample``: each row with its own settings and random generator (numpy's)."""
        logits = self.logits[rows]
        temperatures = np.array(temperature)[:, None]
        greedy = temperatures[:, 0] == 0
        probs = softmax(filter_logits(logits, np.where(temperatures == 0, 1.0, temperatures), top_k,
                                      np.array(top_p)[:, None]).astype(np.float64))  # fmt: skip
        noise = np.stack([g.exponential(size=logits.shape[1]) for g in generators])
        tokens = np.where(greedy, logits.argmax(-1), (probs / noise).argmax(-1))
        self.last[rows] = tokens
        return tokens.tolist()

    def generator(self, seed: int) -> np.random.Generator:
        return np.random.default_rng(seed)


def export_config(export_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of an ONNX export directory, or the Error line that says where the export is."""
    config = export_dir / "config.json"
    if not config.is_file() or "onnx" not in json.loads(config.read_text()):
        inside = export_dir / "onnx"  # format=all's root
        hint = f"onnx={inside}" if (inside / "config.json").is_file() else "format=onnx of python -m gpt2lab.export"
        raise ConfigError(
            f"onnx={str(export_dir)!r} is not an ONNX export directory (config.json and model.onnx): use {hint}"
        )
    return json.loads(config.read_text())


class ONNXTextGenerator(TextGenerator):
    """``gpt2lab.generate.TextGenerator`` over an ONNX export directory: the same ``generate_text`` and chat,
    decoded by onnxruntime."""

    def __init__(self, export_dir: str | os.PathLike, providers: list[str] | None = None) -> None:
        self.path = Path(export_dir).expanduser()
        export_config(self.path)
        self.decoder = ONNXDecoder.from_directory(self.path, providers=providers)
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))

    def complete(self, prompts: list[str], config: Mapping[str, Any], out: TextIO | None = None) -> list[str]:
        settings = dict(config)
        n = settings.get("num_return_sequences", 1)
        input_ids, mask = (
            np.array(rows, np.int64).repeat(n, 0) for rows in left_padded(self.tokenizer, prompts, settings)
        )
        completions = Completions(self.tokenizer, len(input_ids), settings, out)
        tokens = stream_tokens(
            self.decoder, input_ids, mask, settings["max_new_tokens"], settings.get("temperature", 1.0),
            settings.get("top_k"), settings.get("top_p"), settings.get("repetition_penalty", 1.0),
            settings.get("do_sample", True), completions.eos, settings.get("seed"),
        )  # fmt: skip
        for step in tokens:
            if completions.add(step.tolist()):
                break
        return completions.finish()
