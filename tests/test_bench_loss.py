"""``python -m gpt2lab.bench loss`` on CPU: its command line, the one ``Error:`` line without CUDA, and the correctness
column's helper on the plain path (the timed rows need a GPU: the lead runs them, docs/performance.md "Levers")."""

import math

import pytest
import torch

from gpt2lab.bench import loss
from gpt2lab.bench.__main__ import main

CPU = torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_without_cuda_it_stops_with_one_error_line(capsys):
    assert main(["loss", "-b", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "Error: python -m gpt2lab.bench loss times CUDA kernels (Triton, liger-kernel), and this machine has no CUDA GPU"
    ]


def test_the_defaults_are_gpt2_small_at_32_x_1024_tokens():
    args = loss.parse_args([])
    assert (args.batch, args.seq, args.d_model, args.vocab, args.vocab_used) == (32, 1024, 768, 50304, 50257)
    assert (args.warmup, args.repeats, args.json) == (5, 20, None)
    args = loss.parse_args(["-b", "8", "-T", "512", "-d", "1024", "-V", "32000", "--repeats", "3"])
    assert (args.batch * args.seq, args.d_model, args.vocab, args.vocab_used, args.repeats) == (
        4096,
        1024,
        32000,
        32000,
        3,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-b", "0"], "--batch must be at least 1"),
        (["-V", "64", "--vocab-used", "65"], "--vocab-used 65: expected 1 to --vocab (64)"),
        (["--warmup", "-1"], "--warmup must be 0 or more"),
        (["--json", "/nonexistent/dir/loss.json"], "the directory /nonexistent/dir does not exist"),
    ],
)
def test_bad_arguments_get_the_usage_and_one_message(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        loss.parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_the_correctness_column_measures_against_the_plain_path_in_float32():
    inputs = loss.make_inputs(64, 32, 128, 120, CPU, torch.float32)  # columns 120..127 at -inf, as the model's padding
    h, weight, bias, labels = inputs
    assert bias is not None and torch.isinf(bias[120:]).all() and int(labels.max()) < 120
    assert loss.errors(loss.plain_loss, inputs) == {"loss": 0.0, "grad_h": 0.0, "grad_w": 0.0}
    reference = loss.float32_reference(inputs)
    assert math.isfinite(reference[0].item()) and torch.isfinite(reference[2]).all()
    assert reference[2][120:].abs().max() == 0  # the padding rows of W get no gradient
    # bf16 inputs: the rounding of bf16, small beside the values
    low = loss.make_inputs(64, 32, 128, 120, CPU, torch.bfloat16)
    found = loss.errors(loss.plain_loss, low)
    ref_loss, ref_h, ref_w = (t.abs().max().item() for t in loss.float32_reference(low))
    assert 0 < found["loss"] < 1e-2 * ref_loss and found["grad_h"] < 2e-2 * ref_h and found["grad_w"] < 2e-2 * ref_w
    # a wrong loss shows: twice the loss, twice the gradients
    doubled = loss.errors(lambda h, w, b, y: 2 * loss.plain_loss(h, w, b, y), inputs)
    assert doubled["loss"] == pytest.approx(reference[0].item()) and doubled["grad_w"] > 0


def test_without_padding_there_is_no_bias():
    assert loss.make_inputs(8, 16, 32, 32, CPU, torch.float32)[2] is None
