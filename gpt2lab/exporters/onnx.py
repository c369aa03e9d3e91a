"""gpt2lab's GPT-2 as one ONNX decoder graph with a KV cache, exported by ``torch.onnx`` (its dynamo exporter,
which needs ``onnxscript``), optionally optimised offline by onnxruntime, and validated by it.

The graph serves the prompt and every decoding step (``gpt2lab/inference/onnx.py`` runs it):

- inputs: ``input_ids`` and ``position_ids`` (batch, sequence), ``attention_mask`` (batch, past + sequence),
  and ``past_key_values.<layer>.key`` / ``.value`` (batch, heads, past, head_dim): a past of length 0 reads a
  prompt;
- outputs: ``logits`` (batch, sequence, vocabulary) and ``present.<layer>.key`` / ``.value`` (batch, heads,
  past + sequence, head_dim), the next step's past.

Batch, sequence and past lengths are dynamic. The names are those of Hugging Face optimum's GPT-2 exports.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gpt2lab.errors import ConfigError
from gpt2lab.exporters.speed import eager, forward_rows, machine, median_ms, sizes
from gpt2lab.exporters.validation import ExportMismatch, check_close
from gpt2lab.model import GPT2Model

log = logging.getLogger(__name__)
# torch.onnx's dynamo exporter writes opset 18 and converts it to others; converted down to 17, gpt2lab's graph is
# invalid (Split keeps opset 18's num_outputs), and below that the exporter silently keeps 18.
MIN_OPSET = 18
OPTIMIZE_LEVELS = ("none", "basic", "extended", "all")  # onnxruntime's graph optimisation levels
# The levels whose graphs hold onnxruntime's own operators (com.microsoft): there, onnxscript's rewriter first fuses
# each layer's attention, layer norms and GELU into them (``fuse_for_onnxruntime``).
FUSING_LEVELS = ("extended", "all")
FUSED_OPERATORS = ("MultiHeadAttention", "SkipLayerNormalization", "FastGelu")
QUANTIZE = (None, "int8")


class CachedDecoder(nn.Module):
    """``GPT2Model``'s forward over new tokens given the keys and values of the positions before them, as
    plain tensors in and out (what an exported graph needs; ``KVCache`` keeps its bookkeeping in Python)."""

    def __init__(self, model: GPT2Model) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        m, c = self.model, self.model.config
        B, T = input_ids.shape
        P = past[0][0].shape[2]
        H, C = c.num_heads, c.d_model
        x = m.wte(input_ids) + m.wpe(position_ids)  # (B, T, C)
        # A new token sees the real tokens up to itself, and itself (a padding position's row is never empty),
        # as gpt2lab.model.generation.KVCache's mask; additive, (B, 1, T, P + T).
        queries = torch.arange(T, device=x.device) + P
        keys = torch.arange(P + T, device=x.device)
        visible = (keys[None, :] <= queries[:, None]) & attention_mask.bool()[:, None, None, :]
        visible = visible | (keys[None, :] == queries[:, None])
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, float("-inf"))
        presents = []
        for (past_k, past_v), block in zip(past, m.blocks, strict=True):
            q, k, v = block.attn.qkv(block.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            # axis -2, as onnxscript's MultiHeadAttention fusion matches it (2 would leave the cache unfused)
            k, v = torch.cat([past_k, k], -2), torch.cat([past_v, v], -2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            x = x + block.attn.proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
            presents.append((k, v))
        # The vocabulary's rows of the tied embedding only: no padding columns to compute and slice off.
        return F.linear(m.ln_f(x), m.wte.weight[: c.vocab_size]), presents


def graph_shape(model: GPT2Model) -> dict[str, int]:
    """The sizes a runtime needs to build the empty past (``gpt2lab.inference.onnx.ONNXDecoder``)."""
    c = model.config
    return {"num_layers": c.num_layers, "num_heads": c.num_heads, "head_dim": c.d_model // c.num_heads}


def graph_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order."""
    per_layer = [f"{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in per_layer)]
    return inputs, ["logits", *(f"present.{n}" for n in per_layer)]


def decoder_inputs(model: GPT2Model, batch: int, sequence: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the decoder graph, by name: tokens, a mask with some left padding in the first row when
    there is room, and keys and values (as numpy arrays)."""
    c = model.config
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, past + sequence), np.int64)
    if past + sequence > 2 and batch > 1:
        mask[0, : (past + sequence) // 3] = 0
    head_dim = c.d_model // c.num_heads
    feeds = {
        "input_ids": rng.integers(0, c.vocab_size, (batch, sequence)),
        "attention_mask": mask,
        "position_ids": np.maximum(mask.cumsum(1) - 1, 0)[:, past:],
    }
    for name in graph_names(c.num_layers)[0][3:]:
        feeds[name] = rng.standard_normal((batch, c.num_heads, past, head_dim)).astype(np.float32)
    return feeds


def torch_inputs(feeds: dict[str, np.ndarray], num_layers: int) -> tuple[torch.Tensor, ...]:
    """``CachedDecoder``'s arguments for the graph's ``feeds``: the three token tensors, then the past."""
    names = graph_names(num_layers)[0]
    t = {name: torch.from_numpy(feeds[name]) for name in names}
    past = [(t[k], t[v]) for k, v in zip(names[3::2], names[4::2], strict=True)]
    return (*(t[name] for name in names[:3]), past)


def run_decoder(decoder: CachedDecoder, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The PyTorch outputs for ``feeds``, flattened in the graph's output order."""
    with torch.no_grad():
        logits, presents = decoder(*torch_inputs(feeds, decoder.model.config.num_layers))
    return [logits.numpy(), *(x.numpy() for kv in presents for x in kv)]


def supported_opsets() -> range:
    """The opsets torch.onnx can write: its own (18) and those onnxscript's version converter reaches, up to the
    newest the installed onnx knows (beyond the converter's reach the exporter silently keeps 18)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    try:
        from onnxscript.version_converter._version_converter import SUPPORTED_MAX_ONNX_OPSET

        newest = min(newest, SUPPORTED_MAX_ONNX_OPSET)
    except ImportError:  # another onnxscript layout: _export's check of the written opset still refuses
        pass
    return range(MIN_OPSET, newest + 1)


class ONNXExporter:
    """Exports a ``GPT2Model`` as the decoder graph above: ``export(model, output_path)`` writes the ``.onnx``
    file and returns ``output_path``, ``file_size_mb``, ``max_abs_diff`` (onnxruntime against PyTorch on random
    inputs, prompt and decoding step; None without ``validate``) and ``benchmark`` (None unless asked).

    ``optimize`` is an onnxruntime graph optimisation level applied offline (``none``, ``basic``, ``extended``;
    ``all`` adds layout changes for this machine's CPU); at ``extended`` and ``all`` each layer's attention, layer
    norms and GELU are first fused into onnxruntime's operators (``fuse_for_onnxruntime``; ``fused`` in the result
    counts them); ``fp16`` halves the weights and activations for GPU
    runtimes (inputs and outputs stay float32); ``quantize="int8"`` stores the matrix weights as int8 (onnxruntime's
    dynamic quantization: activations quantized on the fly), a quarter of the bytes each decoding step reads on a
    CPU, at some accuracy (logits within ~0.1-0.5; greedy tokens can differ). An export that differs from PyTorch by
    more than ``tolerance`` fails, saying by how much.
    """

    def __init__(
        self,
        opset_version: int = 18,
        optimize: str | bool | None = "extended",
        validate: bool = True,
        benchmark: bool = False,
        fp16: bool = False,
        tolerance: float | None = None,
        quantize: str | None = None,
    ) -> None:
        opsets = supported_opsets()
        if opset_version not in opsets:
            raise ConfigError(
                f"onnx.opset_version={opset_version}: the installed exporter writes opsets {opsets.start} to "
                f"{opsets.stop - 1} (torch {torch.__version__}): choose one of those"
            )
        optimize = {True: "extended", False: "none", None: "none"}.get(optimize, optimize)  # type: ignore[arg-type]
        if optimize not in OPTIMIZE_LEVELS:
            raise ConfigError(f"onnx.optimize={optimize!r}: expected one of {', '.join(OPTIMIZE_LEVELS)}")
        self.opset_version, self.optimize, self.validate, self.benchmark = opset_version, optimize, validate, benchmark
        if quantize not in QUANTIZE:
            raise ConfigError(f"onnx.quantize={quantize!r}: expected null or int8")
        if quantize and fp16:
            raise ConfigError("onnx.quantize=int8 and onnx.fp16=true: choose one (int8 for CPUs, fp16 for GPUs)")
        self.fp16, self.quantize = fp16, quantize
        # float32 graphs match PyTorch to ~1e-5 (GPT-2 124M: 5e-6); fp16 rounds every activation, int8 every weight.
        self.tolerance = tolerance if tolerance is not None else 1.0 if quantize else 0.05 if fp16 else 1e-4

    def export(self, model: GPT2Model, output_path: str | Path, **_: Any) -> dict[str, Any]:
        """Write ``output_path`` (a ``.onnx`` file; a directory gets ``model.onnx``); see the class."""
        import onnx

        path = Path(output_path)
        path = path / "model.onnx" if path.suffix != ".onnx" else path
        path.parent.mkdir(parents=True, exist_ok=True)
        model = model.float().eval()
        decoder = CachedDecoder(model).eval()
        started = time.perf_counter()
        self._export(decoder, path)
        if self.quantize:  # before the optimisation, whose fused operators it would not know
            from onnxruntime.quantization import QuantType, quantize_dynamic

            with quiet_exporter():
                quantize_dynamic(path, path, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        if self.optimize != "none":
            optimize_offline(path, self.optimize)
        if self.fp16:
            from onnxruntime.transformers.float16 import convert_float_to_float16

            half = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
            save_single_file(half, path)
        log.info(
            "ONNX export (opset %d, optimize %s): %.1f s",
            self.opset_version,
            self.optimize,
            time.perf_counter() - started,
        )
        result: dict[str, Any] = {
            "output_path": str(path),
            "file_size_mb": round(path.stat().st_size / 2**20, 2),
            "opset_version": self.opset_version,
            "optimize": self.optimize,
            "fp16": self.fp16,
            "quantize": self.quantize,
            "fused": fused_operators(path),
            "max_abs_diff": None,
            "benchmark": None,
        }
        if self.validate:
            result["max_abs_diff"] = validate(decoder, path, self.tolerance, self.fp16)
        if self.benchmark:
            result["benchmark"] = benchmark_onnx(model, path)
        return result

    def _export(self, decoder: CachedDecoder, path: Path) -> None:
        import onnx

        c = decoder.model.config
        feeds = decoder_inputs(decoder.model, batch=2, sequence=3, past=2)
        inputs, outputs = graph_names(c.num_layers)
        batch, sequence, past_sequence = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence"))
        dynamic_shapes = {
            "input_ids": {0: batch, 1: sequence},
            "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},  # past + sequence
            "position_ids": {0: batch, 1: sequence},
            "past": [({0: batch, 2: past_sequence}, {0: batch, 2: past_sequence}) for _ in range(c.num_layers)],
        }
        with quiet_exporter():
            program = torch.onnx.export(
                decoder, torch_inputs(feeds, c.num_layers), dynamic_shapes=dynamic_shapes, input_names=inputs,
                output_names=outputs, opset_version=self.opset_version, dynamo=True, verbose=False,
            )  # fmt: skip
        if program.model.opset_imports.get("") != self.opset_version:  # the exporter falls back silently
            raise ConfigError(
                f"onnx.opset_version={self.opset_version}: torch.onnx wrote opset {program.model.opset_imports['']} "
                "instead, having no conversion to it: choose an older opset (18 is torch.onnx's own)"
            )
        import onnx_ir

        program.model.graph.inputs[1].shape = onnx_ir.Shape(["batch", "past_sequence + sequence"])  # a readable name
        if self.optimize in FUSING_LEVELS:
            fuse_for_onnxruntime(program.model, c.num_layers)
        save_single_file(onnx_ir.to_proto(program.model), path)
        onnx.checker.check_model(str(path))


def fuse_for_onnxruntime(model: Any, num_layers: int) -> None:
    """Fuse, in place in the ``onnx_ir`` model, each layer's attention (with its past and present keys and values),
    residual layer norms and tanh GELU into onnxruntime's ``com.microsoft`` operators ``MultiHeadAttention``,
    ``SkipLayerNormalization`` and ``FastGelu``, by onnxscript's rewriter (``optimize_for_ort``). onnxruntime's own
    optimizer fuses none of the dynamo exporter's attention (nor its GELU at opset 18), leaving a dozen small operators
    per layer. Attention left unfused (at opsets from 23, written as another pattern, or with an onnxscript whose
    patterns no longer match) is logged as a warning: the graph is still right, only slower."""
    try:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort
    except ImportError:  # an onnxscript older than its onnxruntime fusions
        log.warning("onnxscript has no onnxruntime fusions (onnxscript.rewriter.ort_fusions): attention left unfused")
        return
    with quiet_exporter():
        optimize_for_ort(model)
    attention = sum(node.op_type == "MultiHeadAttention" for node in model.graph.all_nodes())
    if attention != num_layers:
        log.warning(
            "onnxscript fused the attention of %d of %d layers into MultiHeadAttention: the rest runs slower",
            attention,
            num_layers,
        )


def fused_operators(path: Path) -> dict[str, int]:
    """How many of onnxruntime's fused operators (``FUSED_OPERATORS``) the graph at ``path`` holds, by name."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = [node.op_type for node in graph.node if node.domain == "com.microsoft"]
    return {name: ops.count(name) for name in FUSED_OPERATORS}


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch.onnx's progress lines (printed), its axis-naming warnings, onnx_ir's INFO log of every pass and the
    quantizer's advice (on the root logger): kept out of the export's output; a failure raises with its message."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx", None)]  # None: the root
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def save_single_file(model: Any, path: Path) -> None:
    """Save an ONNX ``ModelProto`` with its weights inside; above protobuf's 2 GB, beside it (``<name>.data``)."""
    import onnx

    large = model.ByteSize() > 2**31 - 2**26
    onnx.save_model(model, str(path), save_as_external_data=large, location=path.name + ".data")


def optimize_offline(path: Path, level: str) -> None:
    """Replace the model at ``path`` by onnxruntime's optimisation of it at ``level``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    optimized = path.with_name(path.stem + ".optimized.onnx")
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized.replace(path)


def validate(decoder: CachedDecoder, path: Path, tolerance: float, fp16: bool = False) -> float:
    """The largest absolute difference between onnxruntime's outputs and PyTorch's, on fresh random inputs: a
    prompt (no past) and a decoding step (one token after a past); raises ``ExportMismatch`` above ``tolerance``."""
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider"] if fp16 and "CUDAExecutionProvider" in ort.get_available_providers() else []
    session = ort.InferenceSession(str(path), providers=[*providers, "CPUExecutionProvider"])
    c = decoder.model.config
    cases = {
        "a prompt": decoder_inputs(decoder.model, batch=2, sequence=min(11, c.context_length), past=0, seed=1),
        "a decoding step": decoder_inputs(
            decoder.model, batch=3, sequence=1, past=min(7, c.context_length - 1), seed=2
        ),
    }
    diff = 0.0
    for what, feeds in cases.items():
        expected = run_decoder(decoder, feeds)
        got = session.run(None, feeds)
        for name, a, b in zip(graph_names(c.num_layers)[1], expected, got, strict=True):
            if a.shape != b.shape:
                raise ExportMismatch(f"the ONNX graph's {name} for {what} has shape {b.shape}, PyTorch's {a.shape}")
            diff = max(diff, float(np.abs(a - b.astype(np.float32)).max()))
    check_close(diff, tolerance, f"onnxruntime ({path.name})")
    return diff


def benchmark_onnx(model: GPT2Model, path: str | Path, repeats: int = 5) -> dict[str, Any]:
    """onnxruntime (the exported graph at ``path``) against ``model`` in PyTorch eager: the forward pass, and greedy
    decoding with the KV cache (``exporters.speed``)."""
    from gpt2lab.inference.onnx import ONNXDecoder, stream_tokens

    decoder = ONNXDecoder(path, graph_shape(model), model.config.context_length, threads=torch.get_num_threads())
    rows = forward_rows(model, lambda ids: decoder.prefill(ids.numpy(), np.ones(ids.shape, np.int64)), repeats)
    _, prompt, new = sizes(model, repeats)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    ones = np.ones((1, prompt), np.int64)
    ms = median_ms(
        lambda: eager(model, ids, new),
        lambda: list(stream_tokens(decoder, ids.numpy(), ones, new, do_sample=False)),
        min(repeats, 3),
    )
    rows[f"greedy decoding, batch 1, {prompt} + {new} tokens (tokens/s)"] = {k: 1e3 * new / v for k, v in ms.items()}
    return {"runtime": "onnxruntime", "machine": machine(), "rows": rows}
