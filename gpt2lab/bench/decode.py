"""``python -m gpt2lab.bench decode``: decoding speed of ``GPT2Model.generate`` beside Hugging Face
``transformers``' ``generate`` on the same weights, in the same process, on the same device.

Greedy, a random prompt of ``--prompt`` tokens, ``--new`` new tokens per sequence (no early stop), for each
batch size in ``-b``; the median of ``--repeats`` timed runs after a warm-up run (which captures the CUDA
graphs and compiles). transformers' rows need ``pip install -e ".[hf]"``; ``--hf-static`` adds its static
cache with a compiled forward (GPUs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from omegaconf import OmegaConf

from gpt2lab.config import compose_train, group_options
from gpt2lab.console import table
from gpt2lab.lit.speed import median_seconds
from gpt2lab.model import GPT2Config, GPT2Model

# Peak memory bandwidth (datasheets): at batch 1 every new token reads all the weights once.
BANDWIDTH = {"h200": 4.8e12, "h100": 3.35e12, "a100": 2.0e12}


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
        rows["gpt2lab generate (static cache, CUDA graph)"] = lambda x: model.generate(x, new, do_sample=False)
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
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.model not in group_options("model"):
        parser.error(f"--model {args.model}: no conf/model/{args.model}.yaml")
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
    columns = ["decoder", *(f"batch {b}" for b in args.batch)]
    cells = [[label, *(f"{r:,.0f} tokens/s" for r in row)] for label, row in rates.items()]
    print("\n" + table(columns, cells, markdown=True, align=["left"] + ["right"] * len(args.batch)))
    ours = [label for label in rates if label.startswith("gpt2lab")]
    best = [max(rates[label][i] for label in ours) for i in range(len(args.batch))]  # the fastest gpt2lab row
    for label in rates:
        if label not in ours:
            print(
                f"gpt2lab (fastest row) / {label}: "
                + ", ".join(f"{a / b:.2f}x" for a, b in zip(best, rates[label], strict=True))
            )
    bandwidth = next((bw for chip, bw in BANDWIDTH.items() if chip in name.lower()), None)
    if bandwidth and 1 in args.batch:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        limit = bandwidth / weight_bytes
        print(f"Batch 1 bound by memory bandwidth: {limit:,.0f} tokens/s ({weight_bytes / 1e9:.2f} GB of weights read per "
              f"token at {bandwidth / 1e12:.1f} TB/s); gpt2lab reaches {best[args.batch.index(1)] / limit:.1%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
