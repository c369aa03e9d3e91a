"""Exported models against PyTorch eager on this machine's CPU, in one process and with the same threads:
the median latency of one forward pass at batch 1 and 8 over 128 tokens, and greedy decoding tokens/s at batch
1 with the KV cache (gpt2lab's ``generate`` against the ONNX graph's onnxruntime loop).

``python -m gpt2lab.bench export [--model gpt2-tiny gpt2]`` measures randomly initialised models of the sizes
in ``conf/model/``, exported in float32 and with int8 weights; ``python -m gpt2lab.export ... benchmark=true``
measures the exported checkpoint.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2lab.model import GPT2Model

BATCHES = (1, 8)
SEQUENCE = 128


def median_ms(pytorch: Callable[[], object], exported: Callable[[], object], repeats: int) -> dict[str, float]:
    """The median milliseconds of each, timed in turns (after one warm-up each), so that a burst of load from
    other processes falls on both."""
    pytorch(), exported()
    times: dict[str, list[float]] = {"pytorch": [], "exported": []}
    for _ in range(repeats):
        for name, run in (("pytorch", pytorch), ("exported", exported)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def eager(model: Any, ids: torch.Tensor, new_tokens: int = 0) -> object:
    """A forward pass of ``model`` over ``ids``, or greedy decoding of ``new_tokens`` with gpt2lab's KV cache."""
    return model.generate(ids, new_tokens, do_sample=False) if new_tokens else model(ids)


def machine() -> dict[str, Any]:
    """The CPU, the threads used and how busy the machine was (1-minute load average) when measured."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
    ]
    name = names[0] if cpuinfo.is_file() and names else platform.processor() or platform.machine()
    return {"cpu": name, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}


def sizes(model: GPT2Model, repeats: int) -> tuple[int, int, int]:
    """Sequence, prompt and new tokens that fit the model's context."""
    context = model.config.context_length
    sequence = min(SEQUENCE, context)
    prompt = min(32, context // 4)
    return sequence, prompt, min(64 if repeats > 1 else 8, context - prompt)


def benchmark_onnx(model: GPT2Model, path: str | Path, repeats: int = 5) -> dict[str, Any]:
    """onnxruntime (the exported graph at ``path``) against ``model`` in PyTorch eager."""
    from gpt2lab.exporters.onnx import graph_shape
    from gpt2lab.inference.onnx import ONNXDecoder, stream_tokens

    decoder = ONNXDecoder(path, graph_shape(model), model.config.context_length, threads=torch.get_num_threads())
    sequence, prompt, new = sizes(model, repeats)
    rows: dict[str, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(0)
    for batch in BATCHES:
        ids = torch.randint(0, model.config.vocab_size, (batch, sequence), generator=generator)
        ones = np.ones((batch, sequence), np.int64)
        rows[f"forward, batch {batch} x {sequence} tokens (ms)"] = median_ms(
            lambda ids=ids: eager(model, ids), lambda ids=ids, ones=ones: decoder.prefill(ids.numpy(), ones), repeats
        )
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=generator)
    ones = np.ones((1, prompt), np.int64)
    ms = median_ms(
        lambda: eager(model, ids, new),
        lambda: list(stream_tokens(decoder, ids.numpy(), ones, new, do_sample=False)),
        min(repeats, 3),
    )
    rows[f"greedy decoding, batch 1, {prompt} + {new} tokens (tokens/s)"] = {k: 1e3 * new / v for k, v in ms.items()}
    return {"runtime": "onnxruntime", "machine": machine(), "rows": rows}


def benchmark_torchscript(model: GPT2Model, path: str | Path, repeats: int = 5) -> dict[str, Any]:
    """The TorchScript program at ``path`` against ``model`` in PyTorch eager: the forward pass."""
    program = torch.jit.load(str(path))
    sequence = sizes(model, repeats)[0]
    rows: dict[str, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(0)
    for batch in BATCHES:
        ids = torch.randint(0, model.config.vocab_size, (batch, sequence), generator=generator)
        rows[f"forward, batch {batch} x {sequence} tokens (ms)"] = median_ms(
            lambda ids=ids: eager(model, ids), lambda ids=ids: eager(program, ids), repeats
        )
    return {"runtime": "torchscript", "machine": machine(), "rows": rows}


def format_benchmark(result: dict[str, Any], title: str = "") -> str:
    """A markdown table: PyTorch eager, the export, and the export's speed-up."""
    m = result["machine"]
    lines = [
        f"{title + ': ' if title else ''}{result['runtime']} against PyTorch eager on {m['cpu']} "
        f"({m['threads']} threads of {m['cores']} cores, load average {m['load']:.1f} when measured)",
        "",
        f"| {'':<50} | PyTorch eager | {result['runtime']} | speed-up |",
        "|---|---|---|---|",
    ]
    for what, r in result["rows"].items():
        faster = r["pytorch"] / r["exported"] if "(ms)" in what else r["exported"] / r["pytorch"]
        lines.append(f"| {what:<50} | {r['pytorch']:,.1f} | {r['exported']:,.1f} | {faster:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from gpt2lab.bench.decode import build_model
    from gpt2lab.exporters.onnx import ONNXExporter

    parser = argparse.ArgumentParser(prog="python -m gpt2lab.bench export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["gpt2-tiny", "gpt2"], help="sizes from conf/model/")
    parser.add_argument("--optimize", default="extended", help="onnxruntime optimisation level of the export")
    parser.add_argument("--threads", type=int, help="CPU threads for both (default: torch's, one per core)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.model:
        torch.manual_seed(0)
        model = build_model(name, torch.device("cpu"), torch.float32)
        for quantize in (None, "int8"):
            with tempfile.TemporaryDirectory() as tmp:
                exporter = ONNXExporter(optimize=args.optimize, quantize=quantize)
                exported = exporter.export(model, Path(tmp) / "model.onnx")
                result = benchmark_onnx(model, exported["output_path"], args.repeats)
            weights = "int8 weights" if quantize else "float32"
            title = f"{name} ({model.num_parameters() / 1e6:.1f}M parameters, random weights), ONNX {weights}"
            print(format_benchmark(result, title) + "\n", flush=True)
    return 0
