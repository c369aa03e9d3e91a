"""The fused output layer + cross-entropy (gpt2lab/model/cross_entropy.py) against the plain path, on CPU.

Triton's interpreter runs the real kernel on CPU tensors, but ``triton.jit`` reads ``TRITON_INTERPRET`` when a
kernel is decorated, and other test modules have imported ``gpt2lab.model`` by then. So this file runs itself
once as a script, in a fresh interpreter with the variable set, and prints what it measured as JSON; the tests
assert on those numbers. The reference is ``F.cross_entropy(F.linear(h, W, bias), labels)`` in float64.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2lab.model import cross_entropy

pytest.importorskip("triton")

N, C = 24, 16  # rows (tokens) and model width
BLOCK = 4096  # the kernel's widest block of columns
V, PADDING = BLOCK + 64, 32  # two blocks per row; the last 32 columns pad the vocabulary
PEAK_COLUMN = 4100  # in the second block: its logit tops some rows, so their max is only found there
GRAD_SCALE = 0.25  # Lightning multiplies the loss by 1 / accumulate_grad_batches before backward


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (N, C) h, (V, C) weight, the model's padding bias (0, then -inf) and labels with ignored rows."""
    torch.manual_seed(0)
    h = torch.randn(N, C)
    weight = torch.randn(V, C) / C**0.5
    weight[PEAK_COLUMN] *= 4
    bias = torch.zeros(V)
    bias[-PADDING:] = float("-inf")
    labels = torch.randint(0, V - PADDING, (N,))
    labels[-4:] = torch.arange(V - PADDING - 4, V - PADDING)  # some targets in the second block
    labels[::5] = -100
    return h, weight, bias, labels


def _plain(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight, bias), labels, ignore_index=cross_entropy.IGNORE_INDEX)


def _loss_and_grads(loss_fn, h, weight, bias, labels, dtype=torch.float32) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``loss_fn``'s loss and the gradients of h and weight from ``(GRAD_SCALE * loss).backward()``."""
    h = h.to(dtype, copy=True).requires_grad_()
    weight = weight.to(dtype, copy=True).requires_grad_()
    loss = loss_fn(h, weight, None if bias is None else bias.to(dtype), labels)
    (GRAD_SCALE * loss).backward()
    return loss.item(), h.grad, weight.grad


def _errors(loss_fn, plain_fn, h, weight, bias, labels) -> dict[str, float]:
    """Relative errors of ``loss_fn`` (float32) against ``plain_fn`` (float64) in the loss and both gradients."""
    loss, grad_h, grad_weight = _loss_and_grads(loss_fn, h, weight, bias, labels)
    ref_loss, ref_grad_h, ref_grad_weight = _loss_and_grads(plain_fn, h, weight, bias, labels, torch.float64)

    def relative(grad: torch.Tensor, ref: torch.Tensor) -> float:
        return ((grad.double() - ref).abs().max() / ref.abs().max()).item()

    return {
        "loss": abs(loss - ref_loss) / abs(ref_loss),
        "grad_h": relative(grad_h, ref_grad_h),
        "grad_weight": relative(grad_weight, ref_grad_weight),
    }


class _OpInputDtypes(TorchDispatchMode):
    """Records the dtypes of h and weight as the fused custom op receives them."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.gpt2lab.linear_cross_entropy.default:
            self.dtypes += [str(args[0].dtype), str(args[1].dtype)]
        return func(*args, **(kwargs or {}))


def measure() -> dict:
    """Everything the tests check, run with the kernel under Triton's interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    fused = cross_entropy.linear_cross_entropy
    h, weight, bias, labels = _inputs()
    logits = F.linear(h, weight, bias)
    out = {
        "rows_with_max_past_first_block": (logits.argmax(dim=1) >= BLOCK).sum().item(),
        "labels_past_first_block": (labels >= BLOCK).sum().item(),
        "ignored_labels": (labels == cross_entropy.IGNORE_INDEX).sum().item(),
        "padded_bias": _errors(fused, _plain, h, weight, bias, labels),
        "no_bias": _errors(fused, _plain, h, weight, None, labels),
        # Labels as a strided view (every other element of a longer tensor), as slicing a batch can give.
        "strided_labels": _errors(fused, _plain, h, weight, bias, torch.stack([labels, labels], dim=1)[:, 0]),
    }

    def with_tanh(loss_fn):
        return lambda h, weight, bias, labels: loss_fn(torch.tanh(h), weight, bias, labels)

    compiled = torch.compile(with_tanh(fused), fullgraph=True)
    out["compiled"] = _errors(compiled, with_tanh(_plain), h, weight, bias, labels)

    all_ignored = torch.full_like(labels, cross_entropy.IGNORE_INDEX)
    out["all_ignored_loss"] = fused(h, weight, bias, all_ignored).item()

    _, _, grad_weight = _loss_and_grads(fused, h, weight, bias, labels)
    out["padding_grad_weight_max"] = grad_weight[-PADDING:].abs().max().item()
    out["real_grad_weight_max"] = grad_weight[:-PADDING].abs().max().item()

    dtypes = _OpInputDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), dtypes:
        loss = fused(h, weight, bias, labels).item()
    ref = _plain(h.double(), weight.double(), bias.double(), labels).item()
    out["autocast"] = {"op_input_dtypes": dtypes.dtypes, "loss": abs(loss - ref) / abs(ref)}
    return out


@pytest.fixture(scope="module")
def measured() -> dict:
    # Without the graph caches: they keep a compiled backward after the op's Python backward formula has changed
    # (pytorch/pytorch#144344), and the compile test would check stale code. Compiled C++ kernels stay cached.
    no_graph_cache = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    result = subprocess.run(
        [sys.executable, __file__],
        env={**os.environ, "TRITON_INTERPRET": "1", **no_graph_cache},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_fused_loss_and_grads_match_plain_path_across_vocab_blocks(measured):
    assert measured["rows_with_max_past_first_block"] > 0  # the online max has to rescale its running sum
    assert measured["labels_past_first_block"] > 0
    assert measured["ignored_labels"] > 0
    assert max(measured["padded_bias"].values()) < 1e-5, measured["padded_bias"]


def test_fused_loss_without_bias_matches_plain_path(measured):
    assert max(measured["no_bias"].values()) < 1e-5, measured["no_bias"]


def test_fused_loss_reads_strided_labels_right(measured):
    assert max(measured["strided_labels"].values()) < 1e-5, measured["strided_labels"]


def test_fused_loss_under_torch_compile_fullgraph_matches_plain_path(measured):
    assert max(measured["compiled"].values()) < 1e-5, measured["compiled"]


def test_all_labels_ignored_gives_nan_loss_like_f_cross_entropy(measured):
    assert math.isnan(measured["all_ignored_loss"])


def test_padding_columns_get_exactly_zero_weight_gradient(measured):
    assert measured["real_grad_weight_max"] > 0
    assert measured["padding_grad_weight_max"] == 0


def test_autocast_runs_fused_op_in_bfloat16(measured):
    assert measured["autocast"]["op_input_dtypes"] == ["torch.bfloat16", "torch.bfloat16"]
    assert measured["autocast"]["loss"] < 1e-2


def test_fused_op_is_not_available_on_cpu():
    assert not cross_entropy.available(torch.device("cpu"))  # the model keeps its plain path there


if __name__ == "__main__":
    print(json.dumps(measure()))
