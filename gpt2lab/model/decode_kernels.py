"""A decoding step of gpt2lab's GPT-2 in four Triton kernels per layer, plus attention, for CUDA graphs.

At batch 1 a decoding step is a chain of small kernels: the profile of 64 tokens on an H100 counted about 170 per
token, each a few microseconds whatever it computes (docs/performance.md, Decoding speed). So the step here
fuses each layer's work around its matmuls, which at these batch sizes read the weights and little else:

- ``ln_1`` and the QKV projection, writing the key and value straight into the cache at ``KVCache.index``;
- attention, PyTorch's ``scaled_dot_product_attention`` over the whole cache with ``KVCache.mask``, as before;
- the output projection with its bias and the residual addition;
- ``ln_2`` and the first MLP layer with its bias and GELU;
- the second MLP layer with its bias and the residual addition;

then ``ln_f`` and the output layer in one more. Each kernel computes the layer norm of its rows in float32 in
every program (a row is a few thousand numbers; the weights are what costs), rounds it to the weights' dtype as
PyTorch's layer norm would, and accumulates the matmul in float32. The bias, GELU and residual are added before the
one rounding of the output, where PyTorch rounds after each.

``fused_step`` is what ``generation.DecodeStep`` runs for a static step on a CUDA device when Triton is installed
and the model is gpt2lab's GPT-2 with its biases (``use_bias``); everything else keeps the model's own forward. The
CPU tests run these kernels under Triton's interpreter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decoding keeps the model's forward
    triton = None

BLOCK_M = 16  # rows per program: tl.dot's smallest tile; a batch of 1 to 16 rows is one block


def available(model: nn.Module) -> bool:
    """Whether ``fused_step`` can run ``model``: gpt2lab's GPT-2 with biases, in bf16 or fp16 on a CUDA device,
    with Triton."""
    weight = model.wte.weight
    return (
        triton is not None
        and getattr(model.config, "use_bias", False)  # gpt2lab's GPT2Config (generation.CachedModel's config)
        and weight.device.type == "cuda"
        and weight.dtype in (torch.bfloat16, torch.float16)  # float32 would run tl.dot in TF32
    )


if triton is not None:

    @triton.jit
    def _linear_kernel(
        x_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, res_ptr, out_ptr,
        k_cache_ptr, v_cache_ptr, index_ptr,
        M, N, K, eps,
        stride_xm, stride_wn, stride_rm, stride_om,
        stride_cb, stride_ch, stride_cp, head_dim,
        HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr,
        WRITE_KV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """out = [gelu](layer_norm(x) @ w.T + b) [+ res]; with WRITE_KV, of the QKV projection's 3C columns the
        first C go to ``out`` and the key's and value's to the caches, at position ``index``."""
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = rm < M, rn < N
        if HAS_LN:  # each row's mean and inverse deviation, over all K
            s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & (rk < K)[None, :],
                            other=0.0).to(tl.float32)  # fmt: skip
                s1 += tl.sum(x, axis=1)
                s2 += tl.sum(x * x, axis=1)
            mean = s1 / K
            rstd = 1.0 / tl.sqrt(s2 / K - mean * mean + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )
            w = tl.load(
                w_ptr + rn[None, :] * stride_wn + rk[:, None], mask=mask_n[None, :] & mask_k[:, None], other=0.0
            )
            if HAS_LN:
                gain = tl.load(ln_w_ptr + rk, mask=mask_k, other=0.0).to(tl.float32)
                shift = tl.load(ln_b_ptr + rk, mask=mask_k, other=0.0).to(tl.float32)
                x = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gain[None, :] + shift[None, :]
            acc += tl.dot(x.to(w.dtype), w)  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_N), float32
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GELU:  # GPT-2's tanh approximation: 0.5 a (1 + tanh(u)) = a sigmoid(2u)
            acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
        if HAS_RES:
            res_mask = mask_m[:, None] & mask_n[None, :]
            acc += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=res_mask, other=0.0).to(tl.float32)
        value = acc.to(out_ptr.dtype.element_ty)
        if WRITE_KV:
            C = N // 3
            position = tl.load(index_ptr)
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], value,
                     mask=mask_m[:, None] & (rn < C)[None, :])  # fmt: skip
            row_offset = rm[:, None] * stride_cb + position * stride_cp
            key = rn - C  # the key's columns, then the value's
            in_key = (key >= 0) & (key < C)
            key = tl.where(in_key, key, 0)
            key_offset = row_offset + (key // head_dim)[None, :] * stride_ch + (key % head_dim)[None, :]
            tl.store(k_cache_ptr + key_offset, value, mask=mask_m[:, None] & in_key[None, :])
            val = rn - 2 * C
            in_val = (val >= 0) & (val < C)
            val = tl.where(in_val, val, 0)
            val_offset = row_offset + (val // head_dim)[None, :] * stride_ch + (val % head_dim)[None, :]
            tl.store(v_cache_ptr + val_offset, value, mask=mask_m[:, None] & in_val[None, :])
        else:
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], value, mask=mask_m[:, None] & mask_n[None, :])

    # A handful of shapes of tile, tried once per (N, K) on the first step (before the CUDA graph is recorded).
    _tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        ],
        key=["N", "K"],
    )(_linear_kernel)


def linear(
    x: torch.Tensor,
    layer: nn.Linear,
    norm: nn.LayerNorm | None = None,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``[gelu](layer(norm(x))) [+ residual]`` for (M, K) rows ``x``, in one kernel. ``kv``: (keys, values,
    index), the layer's (B, heads, capacity, head_dim) caches and the position to write: the layer is the QKV
    projection, and only the queries, (M, C), are returned."""
    M, K = x.shape
    N = layer.out_features
    out = torch.empty(M, N // 3 if kv else N, device=x.device, dtype=x.dtype)
    keys, values, index = kv if kv else (out, out, out)
    eps = norm.eps if norm is not None else 0.0
    args = (
        x, norm.weight if norm is not None else x, norm.bias if norm is not None else x, layer.weight,
        layer.bias if layer.bias is not None else x, residual if residual is not None else x, out,
        keys, values, index, M, N, K, eps,
        x.stride(0), layer.weight.stride(0), (residual if residual is not None else x).stride(0), out.stride(0),
        keys.stride(0) if kv else 0, keys.stride(1) if kv else 0, keys.stride(2) if kv else 0,
        keys.shape[3] if kv else 1,
    )  # fmt: skip
    flags = dict(
        HAS_LN=norm is not None, HAS_BIAS=layer.bias is not None, GELU=gelu, HAS_RES=residual is not None,
        WRITE_KV=kv is not None, BLOCK_M=BLOCK_M,
    )  # fmt: skip
    if x.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, BLOCK_M))  # noqa: E731
        _tuned[grid](*args, **flags)
    else:  # Triton's interpreter (the tests): one tile shape
        _linear_kernel[(triton.cdiv(N, 16), triton.cdiv(M, BLOCK_M))](*args, **flags, BLOCK_N=16, BLOCK_K=64)
    return out


def fused_step(model: nn.Module, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
    """The (B, V) float logits after (B, 1) ``tokens``, read into a fixed-shape ``generation.KVCache`` (``fixed_shape``)
    by gpt2lab's ``GPT2Model``: what ``model(tokens, cache=cache)[0][:, -1]`` computes, in the kernels above."""
    c = model.config
    B, H = tokens.shape[0], c.num_heads
    positions = cache.begin(tokens)  # (B, 1); sets cache.mask
    x = (model.wte(tokens) + model.wpe(positions)).view(B, c.d_model)
    for layer, block in enumerate(model.blocks):
        keys, values = cache.keys[layer], cache.values[layer]
        q = linear(x, block.attn.qkv, block.ln_1, kv=(keys, values, cache.index))
        y = F.scaled_dot_product_attention(q.view(B, H, 1, c.d_model // H), keys, values, attn_mask=cache.mask)
        x = linear(y.reshape(B, c.d_model), block.attn.proj, residual=x)
        h = linear(x, block.mlp.fc, block.ln_2, gelu=True)
        x = linear(h, block.mlp.proj, residual=x)
    cache.end()
    return linear(x, model.lm_head, model.ln_f)[:, : c.vocab_size].float()
