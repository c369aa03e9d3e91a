"""``python -m gpt2lab.bench loss``: the output layer and its cross-entropy, forward and backward, side by side on one
CUDA GPU in bf16: plain ``F.cross_entropy`` of the logits compiled with torch.compile, gpt2lab's fused op
(``model/cross_entropy.py``: the matmul, then one Triton kernel that turns each row of logits into its gradient in
place), and liger-kernel's fused linear cross-entropy (chunks of tokens, so the whole logits never exist; it
computes the gradients in the forward pass), with its weight gradient accumulated in bf16 (its default) and in
float32. ``pip install liger-kernel`` for its rows.

For N = B x T tokens of width d and a padded vocabulary of V, whose columns past ``--vocab-used`` get a -inf bias as in
the model: the median ms of forward + backward (CUDA events, after warm-up; a host sync inside an op counts, since a
training step pays for it too), the peak memory of the timed steps, and the largest difference of the loss and of the
gradients of h and W from the plain path computed in float32, the correctness column.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2lab.bench import machine
from gpt2lab.console import table
from gpt2lab.errors import ConfigError
from gpt2lab.lit.speed import describe_load
from gpt2lab.model import cross_entropy

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]  # h (N, d), W (V, d), bias (V,), labels
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
PLAIN = "plain F.cross_entropy, torch.compile"


def plain_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """The output layer and the mean cross-entropy written plainly, as the model's unfused path has them."""
    logits = F.linear(h, weight, bias)
    return F.cross_entropy(logits.float(), labels, ignore_index=cross_entropy.IGNORE_INDEX)


def loss_functions() -> dict[str, LossFn]:
    """Each way to time, by its row's label. liger-kernel's rows only where it is installed."""
    rows: dict[str, LossFn] = {
        PLAIN: torch.compile(plain_loss),
        "gpt2lab linear_cross_entropy (Triton)": cross_entropy.linear_cross_entropy,
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger
    except ImportError:
        print("liger-kernel is not installed (pip install liger-kernel): its rows are left out", file=sys.stderr)
        return rows
    rows["liger-kernel fused linear cross-entropy"] = lambda h, w, b, y: liger(h, w, y, b)
    rows["liger-kernel, float32 accumulation"] = lambda h, w, b, y: liger(h, w, y, b, accum_dtype=torch.float32)
    return rows


def make_inputs(
    tokens: int, d_model: int, vocab: int, vocab_used: int, device: torch.device, dtype: torch.dtype
) -> Inputs:
    """Hidden states of unit scale (as after the final layer norm), a GPT-2-initialised output matrix, the -inf bias of
    the padding columns (None when there are none) and labels among the used columns."""
    generator = torch.Generator(device).manual_seed(0)
    h = torch.randn(tokens, d_model, device=device, dtype=dtype, generator=generator)
    weight = torch.randn(vocab, d_model, device=device, dtype=dtype, generator=generator) * 0.02
    bias = None
    if vocab_used < vocab:
        bias = torch.zeros(vocab, device=device, dtype=dtype)
        bias[vocab_used:] = float("-inf")
    labels = torch.randint(0, vocab_used, (tokens,), device=device, generator=generator)
    return h, weight, bias, labels


def loss_and_grads(loss_fn: LossFn, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``loss_fn``'s loss and the gradients of h and W, in the inputs' dtype."""
    h, weight, bias, labels = inputs
    h, weight = h.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = loss_fn(h, weight, bias, labels)
    grad_h, grad_weight = torch.autograd.grad(loss, (h, weight))
    return loss.detach(), grad_h, grad_weight


def float32_reference(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain path's loss and gradients with every input in float32 (eager): what each row is compared with."""
    h, weight, bias, labels = inputs
    return loss_and_grads(plain_loss, (h.float(), weight.float(), None if bias is None else bias.float(), labels))


def errors(loss_fn: LossFn, inputs: Inputs, reference: tuple[torch.Tensor, ...] | None = None) -> dict[str, float]:
    """The largest absolute difference of ``loss_fn``'s loss, gradient of h and gradient of W from ``reference``
    (default: ``float32_reference(inputs)``)."""
    reference = reference if reference is not None else float32_reference(inputs)
    got = loss_and_grads(loss_fn, inputs)
    names = ("loss", "grad_h", "grad_w")
    return {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip(names, got, reference, strict=True)}


def time_ms(loss_fn: LossFn, inputs: Inputs, warmup: int, repeats: int) -> tuple[float, int]:
    """The median milliseconds of forward + backward over ``repeats`` steps timed with CUDA events after ``warmup``
    untimed ones (compilation, autotuning, the allocator), and the peak bytes allocated during the timed steps."""
    for _ in range(warmup):
        loss_and_grads(loss_fn, inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss_and_grads(loss_fn, inputs)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events), torch.cuda.max_memory_allocated()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; bad values stop with argparse's usage line (exit 2)."""
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.bench loss", description=__doc__.split("\n\n")[0])
    parser.add_argument("-b", "--batch", type=int, default=32, help="sequences (default: 32)")
    parser.add_argument("-T", "--seq", type=int, default=1024, help="tokens per sequence (default: 1024)")
    parser.add_argument("-d", "--d-model", type=int, default=768, help="hidden width (default: 768)")
    parser.add_argument("-V", "--vocab", type=int, default=50304, help="padded vocabulary, W's rows (default: 50304)")
    parser.add_argument(
        "--vocab-used", type=int, help="columns that are real tokens; the rest get -inf (default: 50257 if -V is "
        "50304, else -V)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per row first (default: 5)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per row, median reported (default: 20)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    machine.add_busy_options(parser)
    args = parser.parse_args(argv)
    for name in ("batch", "seq", "d_model", "vocab", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.vocab_used is None:
        args.vocab_used = 50257 if args.vocab == 50304 else args.vocab
    if not 1 <= args.vocab_used <= args.vocab:
        parser.error(f"--vocab-used {args.vocab_used}: expected 1 to --vocab ({args.vocab})")
    if args.json and not args.json.parent.is_dir():
        parser.error(f"--json {args.json}: the directory {args.json.parent} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("Error: python -m gpt2lab.bench loss times CUDA kernels (Triton, liger-kernel), and this machine has "
              "no CUDA GPU", file=sys.stderr)  # fmt: skip
        return 1
    try:
        at_start = machine.wait_for_free_cores(args.busy_ok, args.busy_wait, gpu=True)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    torch.set_float32_matmul_precision("highest")  # the float32 reference in full float32, not TF32
    device, tokens = torch.device("cuda"), args.batch * args.seq
    inputs = make_inputs(tokens, args.d_model, args.vocab, args.vocab_used, device, torch.bfloat16)
    rows = loss_functions()
    print(f"output layer + cross-entropy, forward + backward: N = {args.batch} x {args.seq} = {tokens:,} tokens, "
          f"d {args.d_model}, V {args.vocab} ({args.vocab_used} used), bf16; {torch.cuda.get_device_name(device)}, "
          f"torch {torch.__version__}", flush=True)  # fmt: skip
    results: list[dict[str, object]] = []
    for label, loss_fn in rows.items():
        gc.collect()
        torch.cuda.empty_cache()
        ms, peak = time_ms(loss_fn, inputs, args.warmup, args.repeats)
        results.append({"row": label, "ms": ms, "peak_gb": peak / 1e9})
        print(f"measured: {label}", file=sys.stderr, flush=True)
    at_end = machine.busy_share()
    reference = float32_reference(inputs)  # after the timing, so that its float32 tensors weigh on no row's peak
    for result, loss_fn in zip(results, rows.values(), strict=True):
        result |= errors(loss_fn, inputs, reference)
    base = results[0]["ms"]
    cells = [
        [r["row"], f"{r['ms']:.2f}", f"{base / r['ms']:.2f}x", f"{r['peak_gb']:.2f}",
         f"{r['loss']:.1e}", f"{r['grad_h']:.1e}", f"{r['grad_w']:.1e}"]
        for r in results
    ]  # fmt: skip
    columns = ["output layer + loss", "fwd+bwd ms (median)", "speed vs plain", "peak GB", "|d loss|", "max |d grad h|",
               "max |d grad W|"]  # fmt: skip
    print("\n" + table(columns, cells, markdown=True, align=["left"] + ["right"] * 6))
    loss, grad_h, grad_w = (t.abs().max().item() for t in reference)
    print(f"The differences are from the plain path in float32, whose loss is {loss:.4f}, max |grad h| {grad_h:.1e} "
          f"and max |grad W| {grad_w:.1e}. Peak GB counts the inputs, "
          f"{sum(t.nbytes for t in inputs if t is not None) / 1e9:.2f} GB.")  # fmt: skip
    print(describe_load(at_start, at_end))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "busy_ok", "busy_wait")}
        env = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "load": [at_start, at_end]}
        args.json.write_text(json.dumps({**settings, **env, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
