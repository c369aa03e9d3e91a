"""GPT-2, written as one readable page.

Pre-LayerNorm decoder blocks, learned positions, input and output embeddings tied, GPT-2's
initialisation (including the 1/sqrt(2 * num_layers) scale on the residual projections), and causal
attention through ``F.scaled_dot_product_attention`` so that flash/memory-efficient kernels are used
wherever PyTorch has them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpt2lab.errors import ConfigError
from gpt2lab.model import cross_entropy, generation
from gpt2lab.model.generation import KVCache

EVAL_CHUNK = 8192  # positions whose logits forward(reduction="none") holds at once


@dataclass
class GPT2Config:
    """Architecture of a GPT-2 model; the named sizes live in ``conf/model/*.yaml``."""

    vocab_size: int | None = 50257  # None in YAML: follow the tokenizer
    context_length: int = 1024
    d_model: int = 768
    num_heads: int = 12
    num_layers: int = 12
    d_ff: int = 3072
    dropout: float = 0.1  # on the embeddings
    attention_dropout: float = 0.1  # on the attention probabilities
    residual_dropout: float = 0.1  # on each block's output before the residual add
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    use_bias: bool = True
    gradient_checkpointing: bool = False
    # On CUDA with Triton: the output layer and the loss as one op that never keeps the logits, only their
    # gradient (gpt2lab/model/cross_entropy.py). The same loss; false gives the plain path.
    fused_loss: bool = True
    # Training only (gpt2lab/lit/float8.py): the block's linear layers run their matmuls in float8 through torchao,
    # on GPUs of compute capability 8.9 or more. The weights stay as they are, so checkpoints do not change.
    float8: bool = False
    float8_recipe: str = "tensorwise"  # torchao's scaling recipe: tensorwise (fastest) or rowwise
    # The embedding table gets this many rows rounded up (50257 -> 50304): matmuls whose sizes are
    # multiples of 64 are markedly faster on GPUs. Returned logits are sliced back; the training loss
    # gives the extra columns -inf.
    pad_vocab_size_multiple: int = 64
    # Where the weights start: a directory in Hugging Face format (or a Hub name such as gpt2) whose GPT-2 weights
    # train.py loads (gpt2lab/hf.py); its config.json sets the architecture keys above. None: GPT-2's initialisation.
    init_from: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "vocab_size": self.vocab_size is None or self.vocab_size > 0,
            "context_length": self.context_length > 0,
            "d_model": self.d_model > 0,
            "num_heads": self.num_heads > 0,
            "num_layers": self.num_layers > 0,
            "d_ff": self.d_ff > 0,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}: "
                f"choose num_heads among the divisors of d_model (e.g. {_divisors_near(self.d_model, self.num_heads)})"
            )
        for name in ("dropout", "attention_dropout", "residual_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is unset: build the tokenizer first or set model.vocab_size")
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m


def _divisors_near(n: int, k: int) -> str:
    divisors = [d for d in range(1, min(n, 64) + 1) if n % d == 0]
    return ", ".join(str(d) for d in sorted(divisors, key=lambda d: abs(d - k))[:3])


class MultiHeadAttention(nn.Module):
    """Causal self-attention: one fused QKV projection, SDPA, an output projection."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.use_bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.use_bias)
        self.proj.is_residual_projection = True
        self.attention_dropout = config.attention_dropout
        self.residual_dropout = nn.Dropout(config.residual_dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(  # (B, nh, T, hs)
                q, k, v, dropout_p=self.attention_dropout if self.training else 0.0, is_causal=True
            )
        else:  # decoding: attend to the cached positions too, minus the padding
            k, v = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.residual_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Position-wise MLP with GPT-2's tanh-approximated GELU."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.use_bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.use_bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class DecoderBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=config.use_bias)
        self.attn = MultiHeadAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=config.use_bias)
        self.mlp = FeedForward(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """The language model: ``forward(input_ids, labels=None) -> (logits, loss)``."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon, bias=config.use_bias)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix reads tokens in and writes them out
        # Added to the training logits inside the output matmul (cuBLAS adds a bias in its epilogue): -inf on
        # the padding columns takes them out of the softmax, so the loss is exactly that of the sliced logits,
        # without the sliced copy and its zero-filled gradient (~5% of a GPT-2 small step on an H200). Decided
        # from the config, never from a tensor's values, so that the model can be built on the meta device.
        padded = config.padded_vocab_size > config.vocab_size
        self.register_buffer("logit_bias", torch.empty(config.padded_vocab_size) if padded else None, persistent=False)
        self.init_weights()
        # Counted now: once FSDP shards the parameters, each rank holds only its share of them.
        self._num_parameters = sum(p.numel() for p in self.parameters())
        self._num_position_parameters = self.wpe.weight.numel()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation and the padding columns' -inf. For deferred initialisation (the model built
        under ``torch.device("meta")``), call it after ``to_empty(device=...)``, which leaves every tensor
        uninitialised and gives the output layer its own copy of the embedding: this ties them again."""
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        if self.logit_bias is not None:
            self.logit_bias.fill_(float("-inf"))[: self.config.vocab_size] = 0.0

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * layers),
            # since each block adds two of them and the stream's variance would otherwise grow with depth.
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.num_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count; tied weights are counted once. ``non_embedding`` leaves out positions."""
        return self._num_parameters - (self._num_position_parameters if non_embedding else 0)

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6N plus the attention scores, 12·L·d·T."""
        c = self.config
        return 6 * self.num_parameters(non_embedding=True) + 12 * c.num_layers * c.d_model * c.context_length

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_logits: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``input_ids`` and ``labels`` are (B, T); labels are the next tokens, -100 is ignored.

        Returns ``(logits, loss)``. With labels, logits are returned only if ``return_logits=True``:
        training needs the loss alone, and a (B, T, V) output would be kept alive for the caller.
        ``reduction="none"`` gives the loss of each token instead of their mean, (B, T) nats, 0 where the label is
        -100: evaluation sums them by kind of token. It takes the plain path (the fused op gives the mean alone).
        Decoding passes a ``cache`` (``generation.KVCache``) that holds the positions before ``input_ids``,
        and an ``attention_mask`` (B, T), 0 on left padding.
        """
        T = input_ids.shape[1]
        if self.config.context_length < T:
            raise ValueError(f"sequence length {T} exceeds model.context_length={self.config.context_length}")
        if cache is None:
            pos = torch.arange(T, device=input_ids.device)
        else:  # each row's positions count from its first real token
            pos = cache.begin(torch.ones_like(input_ids) if attention_mask is None else attention_mask)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            if self.config.gradient_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, layer)
        if cache is not None:
            cache.end()
        x = self.ln_f(x)
        vocab_size = self.config.vocab_size
        if labels is None:
            return self.lm_head(x)[..., :vocab_size], None
        fused = self.config.fused_loss and reduction == "mean" and not return_logits
        if fused and cross_entropy.available(x.device):
            return None, cross_entropy.linear_cross_entropy(x, self.lm_head.weight, self.logit_bias, labels)
        if reduction == "none" and not return_logits:  # evaluation: the logits of 8,192 positions at a time, so
            # that a batch never holds its whole (B, T, V) in float32 (6.6 GB for GPT-2 at 32 x 1024)
            h, targets = x.flatten(0, 1), labels.flatten()
            nats = [
                F.cross_entropy(
                    F.linear(h[i : i + EVAL_CHUNK], self.lm_head.weight, self.logit_bias).float(),
                    targets[i : i + EVAL_CHUNK],
                    ignore_index=cross_entropy.IGNORE_INDEX,
                    reduction="none",
                )
                for i in range(0, h.shape[0], EVAL_CHUNK)
            ]
            return None, torch.cat(nats).view_as(labels)
        logits = F.linear(x, self.lm_head.weight, self.logit_bias)  # (B, T, padded V), padding at -inf
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=cross_entropy.IGNORE_INDEX, reduction=reduction
        )
        return (logits[..., :vocab_size] if return_logits else None), (
            loss.view_as(labels) if reduction == "none" else loss
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Continue (B, T) ``input_ids`` by ``max_new_tokens``; returns (B * num_return_sequences, T + new).
        ``options`` are ``generate_stream``'s."""
        new = list(self.generate_stream(input_ids, max_new_tokens, temperature, top_k, generator, **options))
        prompts = input_ids.repeat_interleave(options.get("num_return_sequences", 1), 0)
        return torch.cat([prompts, torch.stack(new, 1)], 1) if new else prompts

    def generate_stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        do_sample: bool = True,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
        num_return_sequences: int = 1,
        seed: int | None = None,
        use_cache: bool = True,
        static_cache: bool | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the (B * num_return_sequences,) next tokens step by step, with a KV cache (see
        ``gpt2lab/model/generation.py``). Left-pad prompts of different lengths and pass their
        ``attention_mask``; a row ends at ``eos_token_id``; ``seed`` makes sampling reproducible;
        ``do_sample=False`` is greedy. ``static_cache`` (default: on CUDA) decodes at fixed shapes, replayed
        as a CUDA graph."""
        was_training = self.training
        self.eval()
        if num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(num_return_sequences, 0)
            attention_mask = (
                None if attention_mask is None else attention_mask.repeat_interleave(num_return_sequences, 0)
            )
        if seed is not None:
            generator = torch.Generator(input_ids.device).manual_seed(seed)
        try:
            yield from generation.stream_tokens(
                self, input_ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, do_sample,
                attention_mask, eos_token_id, generator, use_cache, static_cache,
            )  # fmt: skip
        finally:
            self.train(was_training)
