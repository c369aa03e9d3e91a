"""gpt2lab's GPT-2 as a TorchScript program: ``torch.jit.load("model.pt")(input_ids) -> logits`` in any process
with torch, gpt2lab or not (and from C++ through libtorch)."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2lab.errors import ConfigError
from gpt2lab.exporters.speed import eager, forward_rows, machine
from gpt2lab.exporters.validation import check_close
from gpt2lab.model import GPT2Model

log = logging.getLogger(__name__)
METHODS = ("auto", "script", "trace")


class LogitsModel(nn.Module):
    """``(batch, sequence)`` token ids in, ``(batch, sequence, vocabulary)`` float logits out."""

    def __init__(self, model: GPT2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(input_ids)
        return logits


class TorchScriptExporter:
    """``export(model, output_path)`` writes the program (``output_path``, or ``<it>/model.pt`` for a directory)
    and returns ``output_path``, ``file_size_mb``, ``method`` (the one that worked), ``max_abs_diff`` against
    gpt2lab's model on random tokens of a shape other than the traced one (within ``tolerance``, or the export
    fails) and ``benchmark`` (None unless asked).

    ``method``: ``script`` compiles the Python source, ``trace`` records one forward pass, ``auto`` scripts and
    falls back to tracing where the model's code is more Python than TorchScript knows (gpt2lab's is).
    """

    def __init__(
        self, method: str = "auto", validate: bool = True, benchmark: bool = False, tolerance: float = 1e-4
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"torchscript.method={method!r}: expected one of {', '.join(METHODS)}")
        self.method, self.validate, self.benchmark, self.tolerance = method, validate, benchmark, tolerance

    def export(self, model: GPT2Model, output_path: str | Path, **_: Any) -> dict[str, Any]:
        path = Path(output_path)
        path = path / "model.pt" if path.suffix != ".pt" else path
        path.parent.mkdir(parents=True, exist_ok=True)
        wrapped = LogitsModel(model.float().eval()).eval()
        started = time.perf_counter()
        program, method = self._compile(wrapped)
        torch.jit.save(program, str(path))
        log.info("TorchScript export (torch.jit.%s): %.1f s", method, time.perf_counter() - started)
        result: dict[str, Any] = {
            "output_path": str(path),
            "file_size_mb": round(path.stat().st_size / 2**20, 2),
            "method": method,
            "max_abs_diff": None,
            "benchmark": None,
        }
        if self.validate:
            result["max_abs_diff"] = validate(wrapped, path, self.tolerance)
        if self.benchmark:
            result["benchmark"] = benchmark_torchscript(model, path)
        return result

    def _compile(self, wrapped: LogitsModel) -> tuple[torch.jit.ScriptModule, str]:
        if self.method in ("script", "auto"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit's deprecation notice
                    return torch.jit.script(wrapped), "script"
            except Exception as e:
                if self.method == "script":
                    why = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
                    raise ConfigError(
                        "torchscript.method=script: torch.jit.script cannot compile gpt2lab's model, whose generation "
                        f"code (the KV cache) is more Python than TorchScript knows ({type(e).__name__}: {why}); use "
                        "torchscript.method=trace, or auto (the default), which traces it"
                    ) from e
                log.info("torch.jit.script failed (%s); tracing instead", type(e).__name__)
        example = torch.zeros(1, min(8, wrapped.model.config.context_length), dtype=torch.long)
        with torch.no_grad(), warnings.catch_warnings():
            # The context-length check becomes a constant in the trace: longer inputs are the caller's to avoid.
            warnings.simplefilter("ignore")
            return torch.jit.trace(wrapped, example, check_trace=False), "trace"


def validate(wrapped: LogitsModel, path: Path, tolerance: float) -> float:
    """The program loaded back from ``path`` against the model, on random tokens of two other shapes."""
    program = torch.jit.load(str(path))
    c = wrapped.model.config
    generator = torch.Generator().manual_seed(0)
    diff = 0.0
    for shape in ((1, 1), (3, min(13, c.context_length))):
        ids = torch.randint(0, c.vocab_size, shape, generator=generator)
        with torch.no_grad():
            diff = max(diff, (program(ids) - wrapped(ids)).abs().max().item())
    check_close(diff, tolerance, f"TorchScript ({path.name})")
    return diff


def benchmark_torchscript(model: GPT2Model, path: str | Path, repeats: int = 5) -> dict[str, Any]:
    """The TorchScript program at ``path`` against ``model`` in PyTorch eager: the forward pass (``exporters.speed``)."""
    program = torch.jit.load(str(path))
    rows = forward_rows(model, lambda ids: eager(program, ids), repeats)
    return {"runtime": "torchscript", "machine": machine(), "rows": rows}
