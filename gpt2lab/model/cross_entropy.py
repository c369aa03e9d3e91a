"""The output layer and its cross-entropy as one operation, for CUDA training steps.

Written plainly, ``cross_entropy(h @ W.T + bias, labels)`` reads the (N, V) logits in the forward reduction
and again in the backward, long after they have left the cache, to write their gradient. Here one Triton
kernel reads each row of logits, takes its log-sum-exp and loss, and at once overwrites the row in place with
its gradient, ``softmax - one_hot``, divided by the number of counted labels; the second read of the row comes
right after the first, while the row can still be in L2. The backward then only has the two matmuls left, and
the incoming gradient (a scalar) scales their outputs rather than the (N, V) gradient. For GPT-2 small at 32 x
1024 tokens on an H200 the output layer's forward and backward take 14.6 ms against 16.0 ms compiled plainly.
The result is the mean cross-entropy, with ``ignore_index`` rows left out exactly as ``F.cross_entropy``
leaves them out.

``linear_cross_entropy`` is the entry point. The model calls it on CUDA when Triton is installed. Everywhere
else the model keeps the plain path.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model uses the plain path
    triton = None

IGNORE_INDEX = -100


def available(device: torch.device) -> bool:
    """Whether the fused op can run on ``device``: Triton is installed and the device is a CUDA GPU."""
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _loss_and_grad_kernel(
        logits_ptr,
        labels_ptr,
        losses_ptr,
        scale_ptr,
        n_cols,
        row_stride,
        ignore_index,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        label = tl.load(labels_ptr + row)
        # Pass 1: an online max and sum of exponentials (no second read for the max).
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        counted = label != ignore_index
        target = tl.load(row_ptr + label, mask=counted, other=0.0).to(tl.float32)
        tl.store(losses_ptr + row, tl.where(counted, lse - target, 0.0))
        # Pass 2: the row becomes its gradient, (softmax - one_hot) / (number of counted labels).
        scale = tl.where(counted, tl.load(scale_ptr), 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(row_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
            tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("gpt2lab::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) inputs, (V, C) weight, (V,) bias, (N,) labels -> (mean loss, (N, V) gradient of the logits)."""
    logits = torch.nn.functional.linear(h, weight, bias)  # becomes the gradient in place
    counted = (labels != IGNORE_INDEX).sum()
    scale = 1.0 / counted.float()  # inf where nothing is counted; then every row is ignored and scaled by 0
    losses = torch.empty(labels.shape, dtype=torch.float32, device=h.device)
    block = min(triton.next_power_of_2(logits.shape[1]), 4096)
    _loss_and_grad_kernel[(logits.shape[0],)](
        logits, labels, losses, scale, logits.shape[1], logits.stride(0), IGNORE_INDEX, BLOCK=block, num_warps=8
    )
    return losses.sum() / counted, logits  # 0 / 0 = nan when nothing is counted, as F.cross_entropy gives


@_linear_cross_entropy.register_fake
def _(h, weight, bias, labels):
    return h.new_empty((), dtype=torch.float32), h.new_empty((h.shape[0], weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    h, weight, _, _ = inputs
    ctx.save_for_backward(h, weight, output[1])
    # The gradient output is not differentiated: without this, autograd would fill an (N, V) tensor of zeros
    # for its incoming gradient in every backward.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss: torch.Tensor, _grad_of_grad: torch.Tensor | None):
    h, weight, grad_logits = ctx.saved_tensors
    grad_h = (grad_logits @ weight) * grad_loss.to(h.dtype)  # (N, C)
    grad_weight = (grad_logits.t() @ h) * grad_loss.to(weight.dtype)  # (V, C)
    return grad_h, grad_weight, None, None


_linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias).float(), labels, ignore_index=-100)`` over (..., C) inputs
    and (...) labels, in the autocast dtype when autocast is on (as ``F.linear`` would run)."""
    if bias is not None and bias.requires_grad:
        raise ValueError("linear_cross_entropy: the bias is a constant (the padding mask) and gets no gradient")
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    # The kernel reads labels and rows at unit stride.
    h, labels = h.reshape(-1, h.shape[-1]).to(dtype).contiguous(), labels.reshape(-1).contiguous()
    loss, _ = _linear_cross_entropy(h, weight, bias, labels)
    return loss
