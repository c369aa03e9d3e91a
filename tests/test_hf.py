"""gpt2lab's GPT-2 as a transformers GPT2LMHeadModel: the same logits and the same greedy tokens."""

import re

import pytest
import torch

from gpt2lab.model import GPT2Config, GPT2Model

transformers = pytest.importorskip("transformers")


def test_transformers_copy_computes_the_same_logits_and_tokens():
    from gpt2lab.hf import to_transformers

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1000, context_length=64, d_model=64, num_heads=4, num_layers=2, d_ff=256,
                        dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)  # fmt: skip
    model = GPT2Model(config).eval()
    hf = to_transformers(model)
    x = torch.randint(0, 1000, (2, 30))
    assert (model(x)[0] - hf(x).logits).abs().max() < 1e-5
    ours = model.generate(x, 12, do_sample=False)
    theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         pad_token_id=0)  # fmt: skip
    assert torch.equal(ours, theirs)


def test_hf_round_trip_back_into_gpt2lab_gives_the_same_weights():
    """gpt2lab -> transformers -> gpt2lab: every tensor comes back (padding rows zero), and the logits with it."""
    from gpt2lab.hf import from_transformers, to_transformers

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1000, context_length=64, d_model=64, num_heads=4, num_layers=2, d_ff=256,
                        dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)  # fmt: skip
    model = GPT2Model(config).eval()
    back = from_transformers(to_transformers(model), dropout=0.0, attention_dropout=0.0, residual_dropout=0.0).eval()
    assert back.config == config
    for name, tensor in model.state_dict().items():
        expected = tensor[: config.vocab_size] if name in ("wte.weight", "lm_head.weight") else tensor
        assert torch.equal(back.state_dict()[name][: len(expected)], expected), name
    x = torch.randint(0, 1000, (2, 30))
    assert torch.equal(back(x)[0], model(x)[0])


def test_decode_bench_puts_transformers_beside_gpt2lab():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "gpt2lab.bench", "decode", "--model", "gpt2-tiny", "-b", "1", "2", "--prompt", "8",
         "--new", "8", "--repeats", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "tokens/s" in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| gpt2lab generate (dynamic cache, eager)",  # on a GPU, the CUDA-graph row comes first
        "| transformers generate, dynamic cache",
    ]
    assert all(len(re.findall(r"[\d,]+ tokens/s", row)) == 2 for row in rows)  # batch 1 and batch 2
    assert "gpt2lab (fastest row) / transformers generate, dynamic cache: " in result.stdout
