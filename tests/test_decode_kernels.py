"""The fused decoding step (gpt2lab/model/decode_kernels.py) against the model's own step, on CPU.

Triton's interpreter runs the real kernels on CPU tensors, but ``triton.jit`` reads ``TRITON_INTERPRET`` when a
kernel is decorated, and other test modules have imported ``gpt2lab.model`` by then. So, as in
``test_cross_entropy.py``, this file runs itself once as a script in a fresh interpreter with the variable set and
prints what it measured as JSON; the tests assert on those numbers. In float32 the two steps do the same arithmetic
in another order, so they agree to float32 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gpt2lab.model import GPT2Config, GPT2Model, decode_kernels
from gpt2lab.model.generation import DecodeStep

pytest.importorskip("triton")


def _model(use_bias: bool = True) -> GPT2Model:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, context_length=64, num_layers=2, num_heads=2, d_model=32, use_bias=use_bias,
        dropout=0.0, attention_dropout=0.0, residual_dropout=0.0,
    )  # fmt: skip
    model = GPT2Model(config).eval()
    with torch.no_grad():  # non-trivial layer norms and biases: the kernels must read them, not assume 1 and 0
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _steps(model: GPT2Model, batch: int, prompt: int, steps: int, capacity: int) -> dict[str, float]:
    """Both steps from the same prompt (row 1 left-padded), fed the model's greedy tokens: the largest differences
    of their logits and caches, and whether the tokens they choose agree."""
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt))
    mask = torch.ones_like(ids)
    mask[min(1, batch - 1), :2] = 0
    own, fused = DecodeStep(model, batch, capacity, static=True), DecodeStep(model, batch, capacity, static=True)
    out = {"logits": 0.0, "keys": 0.0, "values": 0.0, "same_tokens": True}
    with torch.no_grad():
        tokens = own.prefill(ids, mask).argmax(-1)
        fused.prefill(ids, mask)
        for _ in range(steps):
            a = own(tokens)
            b = decode_kernels.fused_step(model, tokens[:, None].clone(), fused.cache)
            fused.cache.length += 1
            out["logits"] = max(out["logits"], (a - b).abs().max().item())
            out["keys"] = max(out["keys"], (own.cache.keys - fused.cache.keys).abs().max().item())
            out["values"] = max(out["values"], (own.cache.values - fused.cache.values).abs().max().item())
            out["same_tokens"] &= bool(torch.equal(a.argmax(-1), b.argmax(-1)))
            tokens = a.argmax(-1)
    return out


def measure() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    model = _model()
    return {
        "batch 3": _steps(model, batch=3, prompt=5, steps=3, capacity=16),
        "batch 17, two row blocks": _steps(model, batch=17, prompt=3, steps=1, capacity=8),
        "ring, past the capacity": _steps(model, batch=2, prompt=6, steps=4, capacity=8),
    }


@pytest.fixture(scope="module")
def measured() -> dict:
    result = subprocess.run(
        [sys.executable, __file__], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", ["batch 3", "batch 17, two row blocks", "ring, past the capacity"])
def test_the_fused_step_computes_the_models_step(measured: dict, case: str) -> None:
    m = measured[case]
    assert m["logits"] < 1e-5 and m["keys"] < 1e-5 and m["values"] < 1e-5, m
    assert m["same_tokens"]


def test_only_a_model_with_biases_in_half_precision_on_cuda_takes_it() -> None:
    model = _model()
    assert not decode_kernels.available(model)  # CPU
    assert not decode_kernels.available(model.to(torch.bfloat16))  # still CPU
    assert not decode_kernels.available(_model(use_bias=False))
    assert not DecodeStep(model, 1, 8, static=True)._fused


if __name__ == "__main__":
    print(json.dumps(measure()))
