"""The GPT-2 model."""

from gpt2lab.model.gpt2 import DecoderBlock, FeedForward, GPT2Config, GPT2Model, MultiHeadAttention

__all__ = ["DecoderBlock", "FeedForward", "GPT2Config", "GPT2Model", "MultiHeadAttention"]
