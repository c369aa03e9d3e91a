"""``python -m gpt2lab.bench export [--model gpt2-tiny gpt2]``: exported models against PyTorch eager on this machine's
CPU, for randomly initialised models of the sizes in ``conf/model/``, exported in float32 and with int8 weights. The
rows are an export's own speed check (``gpt2lab.exporters.speed``; ``python -m gpt2lab.export ... benchmark=true``
measures an exported checkpoint the same way), plus each runtime's share of its decoding limit: this machine's copy
bandwidth over the bytes of weights that runtime reads per token (fewer with int8 weights), and the onnxruntime
operators the export fused (``exporters.onnx.fuse_for_onnxruntime``). It measures only while other processes leave
the cores free (``bench.machine``: ``--busy-ok``, ``--busy-wait``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from gpt2lab.bench import machine
from gpt2lab.bench.decode import build_model
from gpt2lab.errors import ConfigError
from gpt2lab.exporters.onnx import ONNXExporter, benchmark_onnx
from gpt2lab.exporters.speed import format_benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.bench export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["gpt2-tiny", "gpt2"], help="sizes from conf/model/")
    parser.add_argument("--optimize", default="extended", help="onnxruntime optimisation level of the export")
    parser.add_argument("--threads", type=int, help="CPU threads for both (default: torch's, one per core)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median)")
    machine.add_busy_options(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        at_start = machine.wait_for_free_cores(args.busy_ok, args.busy_wait)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    bandwidth, source = machine.memory_bandwidth(torch.device("cpu"))
    for name in args.model:
        torch.manual_seed(0)
        model = build_model(name, torch.device("cpu"), torch.float32)
        eager_bytes = machine.weight_bytes_per_token(model)
        for quantize in (None, "int8"):
            with tempfile.TemporaryDirectory() as tmp:
                exporter = ONNXExporter(optimize=args.optimize, quantize=quantize)
                exported = exporter.export(model, Path(tmp) / "model.onnx")
                result = benchmark_onnx(model, exported["output_path"], args.repeats)
                onnx_bytes = machine.onnx_weight_bytes_per_token(exported["output_path"])
            result["machine"]["busy_at_start"] = at_start
            result["limits"] = {"pytorch": bandwidth / eager_bytes, "exported": bandwidth / onnx_bytes}
            weights = "int8 weights" if quantize else "float32"
            title = f"{name} ({model.num_parameters() / 1e6:.1f}M parameters, random weights), ONNX {weights}"
            print(format_benchmark(result, title), flush=True)
            print(
                f"Decoding at batch 1 bound by memory bandwidth: {bandwidth / 1e9:,.1f} GB/s ({source}) over the "
                f"weights read per token, {eager_bytes / 1e9:.3f} GB in PyTorch float32 and {onnx_bytes / 1e9:.3f} GB "
                f"in onnxruntime {weights}",
                flush=True,
            )
            fused = ", ".join(f"{count} {op}" for op, count in exported["fused"].items())
            print(f"onnxruntime's fused operators in the graph (--optimize {args.optimize}): {fused}\n", flush=True)
    return 0
