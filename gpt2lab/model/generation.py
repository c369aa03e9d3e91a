"""Decoding for ``GPT2Model``: a preallocated KV cache, the sampling filters, and the token loop.

A prompt is read once (the prefill); each new token then costs one position, attending to the cached keys
and values of all the positions before it. Prompts of different lengths share a batch left-padded, with
an attention mask: the padding is never attended to, and each row's positions count from its first real
token, so a row decodes exactly as it would alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch
from torch import nn

from gpt2lab.model import decode_kernels

log = logging.getLogger(__name__)


class CachedModel(Protocol):
    """What decoding needs of a model: ``GPT2Model`` is one. Written as a protocol so that this module, which
    ``gpt2.py`` imports for its ``generate``, does not import the model back."""

    config: Any  # GPT2Config: context_length, num_layers, num_heads, d_model
    wte: nn.Embedding  # the token embedding: the device and dtype of the weights

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...


class KVCache:
    """Keys and values of every layer for up to ``capacity`` positions of ``batch_size`` rows, allocated once.

    ``valid`` marks the positions holding real tokens (not left padding); ``next_position`` is each row's
    position id for its next real token.

    A prompt (any length) is read with host-side bookkeeping: the new positions are sliced by ``length``.
    After it, ``fixed_shape = True`` turns the one-token steps into operations whose shapes and addresses
    never change (CUDA graphs and ``torch.compile`` need that): the position written is ``index``, a device
    tensor, and attention reads the whole capacity with ``valid`` as its mask.
    """

    def __init__(
        self, num_layers: int, batch_size: int, num_heads: int, head_dim: int, capacity: int, device, dtype
    ) -> None:
        shape = (num_layers, batch_size, num_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity = capacity
        self.length = 0  # positions filled, the same for every row
        self._new = 0  # positions being added by the forward pass in progress
        self.mask: torch.Tensor | None = None  # what they attend to, for F.scaled_dot_product_attention
        self.fixed_shape = False
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # the position a one-token step writes

    def reset(self) -> None:
        """Empty, to read a new prompt (the keys and values left behind are masked out, never read)."""
        self.valid.zero_()
        self.next_position.zero_()
        self.length, self._new, self.fixed_shape = 0, 0, False

    def begin(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Start a forward pass over (B, T) new tokens (``attention_mask`` 1 for real ones); returns their
        position ids, (B, T)."""
        if self.fixed_shape:  # one real token per row, written at ``index``
            self.valid.index_fill_(1, self.index, True)
            positions = self.next_position[:, None].clone()
            self.next_position += 1
            # Additive rather than boolean: the attention kernel would convert a boolean mask in every layer.
            self.mask = torch.zeros_like(self.valid, dtype=self.keys.dtype).masked_fill_(~self.valid, float("-inf"))
            self.mask = self.mask[:, None, None, :]  # (B, 1, 1, capacity)
            return positions
        T = attention_mask.shape[1]
        if self.length + T > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} positions; {self.length} + {T} do not fit")
        real = attention_mask.bool()
        self.valid[:, self.length : self.length + T] = real
        positions = self.next_position[:, None] + real.long().cumsum(1) - 1
        self.next_position += real.sum(1)
        self._new = T
        self.mask = self._attention_mask()
        return positions.clamp(min=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values (B, nh, T, hs) of ``layer``; return all of them so far."""
        if self.fixed_shape:
            self.keys[layer].index_copy_(2, self.index, k)
            self.values[layer].index_copy_(2, self.index, v)
            return self.keys[layer], self.values[layer]
        end = self.length + self._new
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def first_rows(self, n: int) -> KVCache:
        """The first ``n`` rows as a cache of their own, sharing this one's memory and its ``index``."""
        rows = object.__new__(KVCache)
        rows.__dict__.update(self.__dict__)
        rows.keys, rows.values = self.keys[:, :n], self.values[:, :n]
        rows.valid, rows.next_position = self.valid[:n], self.next_position[:n]
        return rows

    def _attention_mask(self) -> torch.Tensor:
        """(B, 1, T, length + T) booleans: a new token sees the real tokens up to itself, and itself (so that a
        padding position's row is never empty)."""
        end = self.length + self._new
        queries = torch.arange(self.length, end, device=self.valid.device)
        keys = torch.arange(end, device=self.valid.device)
        causal = keys[None, :] <= queries[:, None]  # (T, end)
        itself = keys[None, :] == queries[:, None]
        return ((self.valid[:, None, :end] & causal) | itself)[:, None]

    def end(self) -> None:
        if self.fixed_shape:  # on the device only: a CUDA graph replays kernels, not Python
            self.index.add_(1).remainder_(self.capacity)  # a ring for ``DecodeSlots``; one generation never wraps
            return
        self.length += self._new
        self._new = 0
        self.index.fill_(self.length)


class DecodeStep:
    """The model's one-token step for ``batch_size`` rows over a ``KVCache`` of ``capacity`` positions:
    ``step(tokens)`` takes the (B,) tokens just chosen and returns the (B, V) float logits of the next ones.

    With ``static`` the step runs at fixed shapes (see ``KVCache``) and, on a CUDA device outside autocast, is
    captured once as a CUDA graph and replayed: one launch per token instead of a dozen per layer, which is
    what bounds decoding at small batches (7x faster at batch 1 on an H200). Such a step is built once per
    model, batch size and capacity, and kept (``decode_step``), so that the next generation replays it.
    """

    def __init__(
        self, model: CachedModel, batch_size: int, capacity: int, static: bool, cache: KVCache | None = None
    ) -> None:
        self.model, self.static = model, static
        weight = model.wte.weight
        c = model.config
        self.cache = cache or KVCache(
            c.num_layers, batch_size, c.num_heads, c.d_model // c.num_heads, capacity, weight.device, weight.dtype
        )
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=weight.device)
        self._use_graph = self.static and weight.device.type == "cuda" and not torch.is_autocast_enabled()
        # The step's fused kernels (gpt2lab/model/decode_kernels.py), where the graph records them
        self._fused = self._use_graph and decode_kernels.available(model)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None

    def _logits(self) -> torch.Tensor:
        if self._fused:
            return decode_kernels.fused_step(self.model, self.tokens, self.cache)
        return self.model(self.tokens, cache=self.cache)[0][:, -1, :].float()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Empty the cache and read a prompt, (B, T); returns the logits of each row's next token."""
        self.cache.reset()
        logits = self.model(input_ids, attention_mask=attention_mask, cache=self.cache)[0][:, -1, :].float()
        self.cache.fixed_shape = self.static
        return logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        if self._use_graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            logits = self._graph_logits
        else:
            logits = self._logits()
        if self.static:  # the host's count of the positions filled (the device's is ``cache.index``)
            self.cache.length += 1
        return logits

    def _capture(self) -> None:
        """Warm up on a side stream (as CUDA graphs require), then record one step. The warm-up steps advance
        the cache, so its counters are put back."""
        cache = self.cache
        saved = [t.clone() for t in (cache.index, cache.next_position, cache.valid)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._logits()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread working meanwhile (the samples callback generates
        # mid-training) must not invalidate the capture.
        with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
            self._graph_logits = self._logits()
        for tensor, value in zip((cache.index, cache.next_position, cache.valid), saved, strict=True):
            tensor.copy_(value)


class _DecodeSteps(dict):
    """A model's kept ``DecodeStep``s. Not copied with the model (a deep copy or a pickle starts empty):
    a CUDA graph belongs to the tensors it was recorded on."""

    def __deepcopy__(self, memo: dict) -> _DecodeSteps:
        return _DecodeSteps()

    def __reduce__(self) -> tuple:
        return (_DecodeSteps, ())


def decode_step(model: CachedModel, batch_size: int, capacity: int) -> DecodeStep:
    """The model's static ``DecodeStep`` for this batch size and capacity, built on first use and kept on the
    model. A model moved to another device or dtype since gets a new one."""
    steps = model.__dict__.setdefault("_decode_steps", _DecodeSteps())
    weight = model.wte.weight
    weights = (weight.device, weight.dtype, weight.data_ptr())
    for stale in [key for key in steps if key[2:] != weights]:
        del steps[stale]
    key = (batch_size, capacity, *weights)
    if key not in steps:
        steps[key] = DecodeStep(model, batch_size, capacity, static=True)
    return steps[key]


def eager_decoding() -> AbstractContextManager:
    """Decode a model compiled for training (``compile: true``) without compiling: torch.compile would compile the
    model again for each shape decoding uses (the prompt, each one-token step), which took over a minute for GPT-2
    124M on an H200, and ``torch.compiler.disable`` around the call does not stop a compiled module inside it. The
    training graphs are kept. torch < 2.6 has no ``set_stance``: there decoding compiles as before."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else nullcontext()


def filter_logits(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | None = None,
    top_p: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) logits with temperature applied and the tokens outside top-k / the top-p nucleus at -inf.
    temperature 1, top_k None and top_p None or 1.0 return the logits unchanged. ``temperature`` and ``top_p``
    may be (B, 1) tensors, one value per row (a server's requests each have their own)."""
    if torch.is_tensor(temperature) or temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and (torch.is_tensor(top_p) or top_p < 1.0):
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.float().softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # the tokens after the nucleus (the first one always stays)
        logits = logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    return logits


def penalize_repetition(
    logits: torch.Tensor, seen: torch.Tensor, seen_mask: torch.Tensor, penalty: float
) -> torch.Tensor:
    """As in CTRL and Hugging Face: the logits of tokens already in a row (``seen``, (B, S), where ``seen_mask``)
    are divided by ``penalty`` when positive and multiplied by it when negative."""
    counts = torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, seen, seen_mask.long())
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


@torch.no_grad()
def stream_tokens(
    model: CachedModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    do_sample: bool = True,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    static_cache: bool | None = None,
) -> Iterator[torch.Tensor]:
    """Yield each step's (B,) new tokens. Rows that produced ``eos_token_id`` are finished: they yield it again
    until every row is done (checked every 8 tokens: a host sync). Past the context the window slides: the
    last half context is read again and decoding goes on from there. ``static_cache`` (None: on CUDA devices)
    decodes with a kept static ``DecodeStep``; the cache holds the prompt and the new tokens, rounded up to
    256 positions (fewer graphs kept), or the whole context."""
    context = model.config.context_length
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    if input_ids.shape[1] > context:
        log.warning(
            "The prompt has %d tokens, more than the model's context of %d: keeping its last %d",
            input_ids.shape[1], context, context,
        )  # fmt: skip
        input_ids, mask = input_ids[:, -context:], mask[:, -context:]
    B, T = input_ids.shape
    if static_cache is None:
        static_cache = input_ids.device.type == "cuda"
    capacity = min(context, -(-(T + max_new_tokens) // 256) * 256)
    if use_cache and static_cache:
        step = decode_step(model, B, capacity)
    else:  # built for this call only
        step = DecodeStep(model, B, capacity, static=False)
    history = torch.cat([input_ids, input_ids.new_zeros(B, max_new_tokens)], 1)  # the prompt and each new token
    history_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    next_id = None
    for i in range(max_new_tokens):
        end = T + i
        if next_id is None or not use_cache:  # the prompt; or, without a cache, the whole window again
            logits = step.prefill(history[:, max(0, end - context) : end], history_mask[:, max(0, end - context) : end])
        elif step.cache.length + 1 > step.cache.capacity:  # past the context: slide: read the last half context again
            half = context // 2
            logits = step.prefill(history[:, end - half : end], history_mask[:, end - half : end])
        else:
            logits = step(next_id)
        if repetition_penalty != 1.0:
            logits = penalize_repetition(logits, history[:, :end], history_mask[:, :end].bool(), repetition_penalty)
        if do_sample:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            next_id = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_id = logits.argmax(-1)
        if eos_token_id is not None:
            next_id = next_id.masked_fill(finished, eos_token_id)
            finished |= next_id == eos_token_id
        history[:, end] = next_id
        yield next_id
        if eos_token_id is not None and i % 8 == 7 and bool(finished.all()):
            return


def sample_rows(
    logits: torch.Tensor,
    temperature: list[float],
    top_p: list[float],
    generators: list[torch.Generator],
    top_k: int | None = None,
) -> torch.Tensor:
    """One token per row of (N, V) ``logits``, each row with its own temperature (0: greedy), top-p and random
    generator: a row draws the same tokens whatever else shares its batch (the exponential race: argmax of
    p / E with E ~ Exp(1) is a draw from p, and each row's E comes from its own generator)."""
    device = logits.device
    temperatures = torch.tensor(temperature, device=device)
    greedy = temperatures == 0
    nucleus = torch.tensor(top_p, device=device)[:, None] if min(top_p) < 1.0 else None
    probs = filter_logits(logits, torch.where(greedy, 1.0, temperatures)[:, None], top_k, nucleus).softmax(-1)
    noise = torch.stack([torch.empty(logits.shape[1], device=device).exponential_(generator=g) for g in generators])
    return torch.where(greedy, logits.argmax(-1), (probs / noise).argmax(-1))


class DecodeSlots:
    """``batch_size`` rows decoding independently over one static KV cache of the whole context: a server's
    continuous batching. A prompt joins a free row (``admit``) while the other rows go on, and each ``step``
    moves every row by one token.

    The rows share the column a step writes, which goes round the cache as a ring. GPT-2 keeps positions in its
    embeddings, not in where a key is stored, so a row's keys may sit anywhere in its row of the cache; a row
    holds at most the context (its prompt and its tokens), so it never reaches its own oldest column.

    A step reads only the first rows, as many as the highest row in use needs, rounded up to a power of two: one
    request alone costs one row, not ``batch_size``. On a GPU each of those sizes is a CUDA graph, all recorded
    when the slots are made, before any row holds keys that a recording's warm-up steps would overwrite.
    """

    def __init__(self, model: CachedModel, batch_size: int) -> None:
        self.model = model
        c, weight = model.config, model.wte.weight
        self.cache = KVCache(c.num_layers, batch_size, c.num_heads, c.d_model // c.num_heads, c.context_length,
                             weight.device, weight.dtype)  # fmt: skip
        self.cache.fixed_shape = True
        sizes = sorted({min(1 << i, batch_size) for i in range(batch_size.bit_length() + 1)})
        self.steps = {n: DecodeStep(model, n, c.context_length, True, self.cache.first_rows(n)) for n in sizes}
        self.used: set[int] = set()
        self.free = torch.ones(batch_size, dtype=torch.bool, device=weight.device)
        self.last = torch.zeros(batch_size, dtype=torch.long, device=weight.device)  # each row's token to read next
        self.logits = torch.zeros(batch_size, c.vocab_size, device=weight.device)
        with torch.no_grad():
            for n, step in self.steps.items():
                step(self.last[:n])
        self.cache.valid.zero_()
        self.cache.next_position.zero_()

    @torch.no_grad()
    def admit(self, row: int, prompt: list[int]) -> None:
        """Read ``prompt`` into ``row`` (whatever it held is forgotten); its next token's logits await ``sample``."""
        c, cache, weight = self.model.config, self.cache, self.model.wte.weight
        ids = torch.tensor([prompt], device=weight.device)
        alone = KVCache(
            c.num_layers, 1, c.num_heads, c.d_model // c.num_heads, len(prompt), weight.device, weight.dtype
        )
        self.logits[row] = self.model(ids, attention_mask=torch.ones_like(ids), cache=alone)[0][0, -1].float()
        # the columns just before the one the next step writes
        columns = (cache.index - len(prompt) + torch.arange(len(prompt), device=weight.device)) % cache.capacity
        cache.keys[:, row].index_copy_(2, columns, alone.keys[:, 0])
        cache.values[:, row].index_copy_(2, columns, alone.values[:, 0])
        cache.valid[row] = False
        cache.valid[row, columns] = True
        cache.next_position[row] = len(prompt)
        self.free[row] = False
        self.used.add(row)

    def release(self, row: int) -> None:
        self.free[row] = True
        self.used.discard(row)

    @torch.no_grad()
    def step(self) -> None:
        """Every row in use reads its last token; the logits of the next ones await ``sample``."""
        if not self.used:
            return
        n = min(size for size in self.steps if size > max(self.used))
        self.cache.next_position.masked_fill_(self.free, 0)  # a free row reads filler: its positions stay in range
        self.logits[:n].copy_(self.steps[n](self.last[:n]))

    @torch.no_grad()
    def sample(
        self, rows: list[int], temperature: list[float], top_p: list[float], generators: list, top_k: int | None
    ) -> list[int]:
        """The next token of each of ``rows`` (``sample_rows``), kept as what those rows read next."""
        index = torch.tensor(rows, device=self.last.device)
        tokens = sample_rows(self.logits[index], temperature, top_p, generators, top_k)
        self.last.index_copy_(0, index, tokens)
        return tokens.tolist()

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.last.device).manual_seed(seed)
