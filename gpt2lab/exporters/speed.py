"""An export's speed beside PyTorch eager on this machine's CPU, in one process and with the same threads: what
``benchmark=true`` adds to an export (``ONNXExporter``, ``TorchScriptExporter``) and ``python -m gpt2lab.bench
export`` prints for random models.

The rows: the median latency of one forward pass at batch 1 and 8 over 128 tokens and, for ONNX, greedy decoding
tokens/s at batch 1 with the KV cache (gpt2lab's ``generate`` against the graph's onnxruntime loop).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt2lab.console import table
from gpt2lab.lit.speed import busy_share, describe_load, median_seconds
from gpt2lab.model import GPT2Model

BATCHES = (1, 8)
SEQUENCE = 128


def median_ms(pytorch: Callable[[], object], exported: Callable[[], object], repeats: int) -> dict[str, float]:
    """The median milliseconds of each, timed in turns (after one warm-up each), so that a burst of load from
    other processes falls on both."""
    seconds = median_seconds(pytorch, exported, repeats=repeats)
    return {name: 1e3 * s for name, s in zip(("pytorch", "exported"), seconds, strict=True)}


@torch.inference_mode()
def eager(model: Any, ids: torch.Tensor, new_tokens: int = 0) -> object:
    """A forward pass of ``model`` over ``ids``, or greedy decoding of ``new_tokens`` with gpt2lab's KV cache."""
    return model.generate(ids, new_tokens, do_sample=False) if new_tokens else model(ids)


def machine() -> dict[str, Any]:
    """The CPU, the threads used and how busy other processes kept its cores (``busy_share``) as the measurement
    ended; a benchmark that read it at the start too adds ``busy_at_start``."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
    ]
    name = names[0] if cpuinfo.is_file() and names else platform.processor() or platform.machine()
    return {"cpu": name, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "busy_share": busy_share()}


def sizes(model: GPT2Model, repeats: int) -> tuple[int, int, int]:
    """Sequence, prompt and new tokens that fit the model's context."""
    context = model.config.context_length
    sequence = min(SEQUENCE, context)
    prompt = min(32, context // 4)
    return sequence, prompt, min(64 if repeats > 1 else 8, context - prompt)


def forward_rows(model: GPT2Model, exported: Callable[[torch.Tensor], object], repeats: int) -> dict[str, Any]:
    """The forward pass of the export (``exported(ids)``) against ``model``'s, at each of ``BATCHES``."""
    sequence = sizes(model, repeats)[0]
    rows: dict[str, dict[str, float]] = {}
    generator = torch.Generator().manual_seed(0)
    for batch in BATCHES:
        ids = torch.randint(0, model.config.vocab_size, (batch, sequence), generator=generator)
        rows[f"forward, batch {batch} x {sequence} tokens (ms)"] = median_ms(
            lambda ids=ids: eager(model, ids), lambda ids=ids: exported(ids), repeats
        )
    return rows


def format_benchmark(result: dict[str, Any], title: str = "") -> str:
    """A Markdown table: PyTorch eager, the export, and the export's speed-up, under a line that says the load it was
    measured at. ``result["limits"]``, where a benchmark adds it (``python -m gpt2lab.bench export``), is each
    column's decoding limit in tokens/s: a row after the decoding row gives the share of it that each reached."""
    m = result["machine"]
    lines = [
        f"{title + ': ' if title else ''}{result['runtime']} against PyTorch eager on {m['cpu']} "
        f"({m['threads']} threads of {m['cores']} cores; {describe_load(m.get('busy_at_start'), m['busy_share'])})",
    ]
    rows = []
    for what, r in result["rows"].items():
        faster = r["pytorch"] / r["exported"] if "(ms)" in what else r["exported"] / r["pytorch"]
        rows.append((what, f"{r['pytorch']:,.1f}", f"{r['exported']:,.1f}", f"{faster:.2f}x"))
        if "limits" in result and "(tokens/s)" in what:
            share = [f"{r[k] / result['limits'][k]:.0%} of {result['limits'][k]:,.0f}" for k in ("pytorch", "exported")]
            rows.append(("  share of its bandwidth limit (limit in tokens/s)", *share, ""))
    columns = ["", "PyTorch eager", result["runtime"], "speed-up"]
    lines += ["", table(columns, rows, markdown=True, align=["left", "right", "right", "right"])]
    return "\n".join(lines)
