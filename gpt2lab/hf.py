"""Hugging Face ``transformers`` interop: gpt2lab's GPT-2 as a ``GPT2LMHeadModel`` with the same weights.

``transformers`` is optional (``pip install -e ".[hf]"``). Its GPT-2 keeps the projections in ``Conv1D``
layers, whose weights are the transpose of ``nn.Linear``'s, and has no vocabulary padding.
"""

from __future__ import annotations

from typing import Any

import torch

from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT2Model


def to_transformers(model: GPT2Model) -> Any:
    """A ``transformers.GPT2LMHeadModel`` computing the same logits as ``model`` (float32: within 1e-5)."""
    try:
        import transformers
    except ImportError as e:
        raise ConfigError('transformers is not installed: pip install -e ".[hf]"') from e
    c = model.config
    if not c.use_bias:
        raise ConfigError("transformers' GPT-2 has biases everywhere; this model has model.use_bias=false")
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.context_length, n_embd=c.d_model, n_layer=c.num_layers,
        n_head=c.num_heads, n_inner=c.d_ff, activation_function="gelu_new", layer_norm_epsilon=c.layer_norm_epsilon,
        bos_token_id=None, eos_token_id=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(hf_config)
    state = {
        "transformer.wte.weight": model.wte.weight[: c.vocab_size],
        "transformer.wpe.weight": model.wpe.weight,
        "transformer.ln_f.weight": model.ln_f.weight,
        "transformer.ln_f.bias": model.ln_f.bias,
    }
    for i, block in enumerate(model.blocks):
        h = f"transformer.h.{i}."
        state |= {
            h + "ln_1.weight": block.ln_1.weight, h + "ln_1.bias": block.ln_1.bias,
            h + "ln_2.weight": block.ln_2.weight, h + "ln_2.bias": block.ln_2.bias,
            h + "attn.c_attn.weight": block.attn.qkv.weight.T, h + "attn.c_attn.bias": block.attn.qkv.bias,
            h + "attn.c_proj.weight": block.attn.proj.weight.T, h + "attn.c_proj.bias": block.attn.proj.bias,
            h + "mlp.c_fc.weight": block.mlp.fc.weight.T, h + "mlp.c_fc.bias": block.mlp.fc.bias,
            h + "mlp.c_proj.weight": block.mlp.proj.weight.T, h + "mlp.c_proj.bias": block.mlp.proj.bias,
        }  # fmt: skip
    with torch.no_grad():
        missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # lm_head is tied to wte
        raise RuntimeError(f"weights did not map onto transformers' GPT-2: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf.to(model.wte.weight.device).eval()
