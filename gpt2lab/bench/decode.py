"""``python -m gpt2lab.bench decode``: decoding speed of ``GPT2Model.generate`` beside Hugging Face
``transformers``' ``generate`` on the same weights, in the same process, on the same device.

Greedy, a random prompt of ``--prompt`` tokens, ``--new`` new tokens per sequence (no early stop), for each
batch size in ``-b``; the median of ``--repeats`` timed runs after a warm-up run (which captures the CUDA
graphs and compiles). At batch 1 every new token reads all the weights once, so the table gives each row's share
of that limit: the memory bandwidth (a GPU's datasheet peak, a CPU's measured copy bandwidth) over the bytes of
weights. It measures only while other processes leave the CPU cores free (``bench.machine``: ``--busy-ok``,
``--busy-wait``) and says how busy they were. transformers' rows need ``pip install -e ".[hf]"``; ``--hf-static`` adds its static
cache with a compiled forward (GPUs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from omegaconf import OmegaConf

from gpt2lab.bench import machine
from gpt2lab.config import compose_train, group_options
from gpt2lab.console import table
from gpt2lab.errors import ConfigError
from gpt2lab.lit.speed import describe_load, median_seconds
from gpt2lab.model import GPT2Config, GPT2Model, decode_kernels


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> GPT2Model:
    """A randomly initialised model of the size ``conf/model/<name>.yaml`` describes, composed as ``train.py``
    composes the model group (the sizes inherit from ``gpt2``), without dropout."""
    fields = OmegaConf.to_container(compose_train([f"model={name}", "~preset"]).model, resolve=True)
    fields.pop("_target_")
    fields |= {"vocab_size": fields.get("vocab_size") or 50257, "dropout": 0.0, "attention_dropout": 0.0}
    fields |= {"residual_dropout": 0.0}
    return GPT2Model(GPT2Config(**fields)).to(device=device, dtype=dtype).eval()


def decoders(
    model: GPT2Model, new: int, dtype: torch.dtype, hf: bool = True, hf_static: bool = False
) -> dict[str, Callable[[torch.Tensor], object]]:
    """Each decoder to time, by its row's label: a batch of prompts in, ``new`` greedy tokens each out."""
    rows: dict[str, Callable[[torch.Tensor], object]] = {}
    if model.wte.weight.device.type == "cuda":
        fused = ", fused kernels" if decode_kernels.available(model) else ""
        rows[f"gpt2lab generate (static cache, CUDA graph{fused})"] = lambda x: model.generate(x, new, do_sample=False)
    rows["gpt2lab generate (dynamic cache, eager)"] = lambda x: model.generate(
        x, new, do_sample=False, static_cache=False
    )
    if not hf:
        return rows
    from gpt2lab.hf import to_transformers

    options = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    dynamic = to_transformers(model.float()).to(dtype)
    model.to(dtype)
    rows["transformers generate, dynamic cache"] = lambda x: dynamic.generate(
        x, attention_mask=torch.ones_like(x), **options
    )
    if hf_static:
        static = to_transformers(model.float()).to(dtype)
        model.to(dtype)
        static.generation_config.cache_implementation = "static"  # generate compiles the forward for it
        rows["transformers generate, static cache, compiled"] = lambda x: static.generate(
            x, attention_mask=torch.ones_like(x), **options
        )
    return rows


def decode_table(rates: dict[str, list[float]], batches: list[int], limit: float | None) -> str:
    """The Markdown table: tokens/s of each decoder at each batch size and, given the batch-1 ``limit`` (tokens/s),
    the share of it that each decoder reaches."""
    columns = ["decoder", *(f"batch {b}" for b in batches)]
    cells = [[label, *(f"{r:,.0f} tokens/s" for r in row)] for label, row in rates.items()]
    if limit:
        columns.append("batch 1, share of the bandwidth limit")
        for cell, row in zip(cells, rates.values(), strict=True):
            cell.append(f"{row[batches.index(1)] / limit:.1%}")
    return table(columns, cells, markdown=True, align=["left"] + ["right"] * (len(columns) - 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.bench decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="a model size from conf/model/ (default: gpt2, 124M)")
    parser.add_argument("-b", "--batch", type=int, nargs="+", default=[1, 16], help="batch sizes")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=256, help="new tokens per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on GPUs, fp32 on CPUs")
    parser.add_argument("--no-hf", action="store_true", help="leave out transformers' rows")
    parser.add_argument(
        "--hf-static", action="store_true", help="add transformers' static cache (compiled by generate)"
    )
    machine.add_busy_options(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.model not in group_options("model"):
        parser.error(f"--model {args.model}: no conf/model/{args.model}.yaml")
    try:
        at_start = machine.wait_for_free_cores(args.busy_ok, args.busy_wait, gpu=device.type == "cuda")
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    bandwidth, source = machine.memory_bandwidth(device) if 1 in args.batch else (None, "")
    torch.manual_seed(0)
    model = build_model(args.model, device, dtype)
    rows = decoders(model, args.new, dtype, hf=not args.no_hf, hf_static=args.hf_static)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model}: {model.num_parameters() / 1e6:.0f}M parameters, {str(dtype).removeprefix('torch.')}, "
          f"prompt {args.prompt}, {args.new} new tokens, greedy; {name}, torch {torch.__version__}", flush=True)  # fmt: skip
    rates: dict[str, list[float]] = {}
    for label, decode in rows.items():
        rates[label] = []
        for batch in args.batch:
            x = torch.randint(0, model.config.vocab_size, (batch, args.prompt), device=device)
            (seconds,) = median_seconds(lambda decode=decode, x=x: decode(x), repeats=args.repeats, device=device)
            rates[label].append(batch * args.new / seconds)
        print(f"measured: {label}", file=sys.stderr, flush=True)  # the table comes once every row is measured
    at_end = machine.busy_share()
    weight_bytes = machine.weight_bytes_per_token(model)
    limit = bandwidth / weight_bytes if bandwidth else None  # tokens/s at batch 1
    print("\n" + decode_table(rates, args.batch, limit))
    print(describe_load(at_start, at_end))
    ours = [label for label in rates if label.startswith("gpt2lab")]
    best = [max(rates[label][i] for label in ours) for i in range(len(args.batch))]  # the fastest gpt2lab row
    for label in rates:
        if label not in ours:
            print(
                f"gpt2lab (fastest row) / {label}: "
                + ", ".join(f"{a / b:.2f}x" for a, b in zip(best, rates[label], strict=True))
            )
    if limit:
        reached = best[args.batch.index(1)] / limit
        print(f"{machine.limit_line(limit, weight_bytes, bandwidth, source)}; gpt2lab reaches {reached:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
