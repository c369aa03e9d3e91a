"""Decoding for ``GPT2Model``: a preallocated KV cache, the sampling filters, and the token loop.

A prompt is read once (the prefill); each new token then costs one position, attending to the cached keys
and values of all the positions before it. Prompts of different lengths share a batch left-padded, with
an attention mask: the padding is never attended to, and each row's positions count from its first real
token, so a row decodes exactly as it would alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from gpt2lab.model.gpt2 import GPT2Model

log = logging.getLogger(__name__)


class KVCache:
    """Keys and values of every layer for up to ``capacity`` positions of ``batch_size`` rows, allocated once.

    ``valid`` marks the positions holding real tokens (not left padding); ``next_position`` is each row's
    position id for its next real token.
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

    def begin(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Start a forward pass over (B, T) new tokens (``attention_mask`` 1 for real ones); returns their
        position ids, (B, T)."""
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
        end = self.length + self._new
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

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
        self.length += self._new
        self._new = 0


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """(B, V) logits with temperature applied and the tokens outside top-k / the top-p nucleus at -inf.
    temperature 1, top_k None and top_p None or 1.0 return the logits unchanged."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
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
    model: GPT2Model,
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
) -> Iterator[torch.Tensor]:
    """Yield each step's (B,) new tokens. Rows that produced ``eos_token_id`` are finished: they yield it again
    until every row is done (checked every 8 tokens: a host sync). Past the context the window slides: the
    last half context is read again and decoding goes on from there."""
    context = model.config.context_length
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    if input_ids.shape[1] > context:
        log.warning(
            "The prompt has %d tokens, more than the model's context of %d: keeping its last %d",
            input_ids.shape[1], context, context,
        )  # fmt: skip
        input_ids, mask = input_ids[:, -context:], mask[:, -context:]
    history, history_mask = input_ids, mask
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    cache = _new_cache(model, input_ids)
    pending, pending_mask = input_ids, mask  # what the next forward pass reads
    for step in range(max_new_tokens):
        if not use_cache:  # the whole window read again for every token (the slow reference path)
            cache = _new_cache(model, input_ids)
            pending, pending_mask = history[:, -context:], history_mask[:, -context:]
        elif cache.length + pending.shape[1] > context:  # slide: read the last half context again
            cache = _new_cache(model, input_ids)
            pending, pending_mask = history[:, -(context // 2) :], history_mask[:, -(context // 2) :]
        logits = model(pending, attention_mask=pending_mask, cache=cache)[0][:, -1, :].float()
        if repetition_penalty != 1.0:
            logits = penalize_repetition(logits, history, history_mask.bool(), repetition_penalty)
        if do_sample:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            next_id = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_id = logits.argmax(-1)
        if eos_token_id is not None:
            next_id = next_id.masked_fill(finished, eos_token_id)
            finished |= next_id == eos_token_id
        yield next_id
        pending, pending_mask = next_id[:, None], torch.ones_like(next_id)[:, None]
        history = torch.cat([history, pending], 1)
        history_mask = torch.cat([history_mask, pending_mask], 1)
        if eos_token_id is not None and step % 8 == 7 and bool(finished.all()):
            return


def _new_cache(model: GPT2Model, input_ids: torch.Tensor) -> KVCache:
    c = model.config
    return KVCache(
        c.num_layers, input_ids.shape[0], c.num_heads, c.d_model // c.num_heads, c.context_length,
        input_ids.device, model.wte.weight.dtype,
    )  # fmt: skip
