"""Exporting a trained model out of gpt2lab (``python -m gpt2lab.export ckpt=... format=hf|onnx|torchscript|all
output_dir=...`` is its command).

Each format's directory holds the tokenizer, ``config.json``, the weights in safetensors and a model card
(``README.md``), beside its own files: ``hf`` is what ``transformers`` loads, ``onnx`` a decoder graph with a KV
cache for onnxruntime (``python -m gpt2lab.generate onnx=<dir>`` decodes with it, without PyTorch),
``torchscript`` a program ``torch.jit.load`` runs. Every export is loaded back and compared with the model on
random inputs; one that differs beyond ``tolerance`` fails and leaves nothing behind. See docs/import-export.md, "Export".
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from gpt2lab.checkpoint import find_checkpoint, load_checkpoint, saved_chat_template
from gpt2lab.console import table
from gpt2lab.errors import ConfigError
from gpt2lab.exporters.directory import check_output_dir, write_tokenizer, write_weights
from gpt2lab.exporters.model_card import ModelCardGenerator
from gpt2lab.exporters.speed import format_benchmark
from gpt2lab.model import GPT2Model
from gpt2lab.tokenizers.chat_template import ChatTemplate

log = logging.getLogger("gpt2lab.export")
FORMATS = ("hf", "onnx", "torchscript")


def make_exporters(cfg: DictConfig, formats: list[str]) -> dict[str, Any]:
    """The exporter of each format, built (and their settings checked) before anything is written."""
    exporters: dict[str, Any] = {}
    if "hf" in formats:
        from gpt2lab.exporters.huggingface import HFExporter

        exporters["hf"] = HFExporter(cfg.validate, cfg.tolerance or 1e-4)
    if "onnx" in formats:
        from gpt2lab.exporters.onnx import ONNXExporter

        o = cfg.onnx
        exporters["onnx"] = ONNXExporter(
            o.opset_version, o.optimize, cfg.validate, cfg.benchmark, o.fp16, cfg.tolerance, o.quantize
        )
    if "torchscript" in formats:
        from gpt2lab.exporters.torchscript import TorchScriptExporter

        method = cfg.torchscript.method
        exporters["torchscript"] = TorchScriptExporter(method, cfg.validate, cfg.benchmark, cfg.tolerance or 1e-4)
    return exporters


def export(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Export ``cfg.ckpt`` as ``conf/export.yaml`` describes; returns each format's result (``summary`` makes
    the table the command prints of them). Every exporter is built, and the checkpoint checked, before anything
    is written; the formats are staged in ``<output_dir>.partial`` and renamed once all are validated."""
    if cfg.format not in (*FORMATS, "all"):
        raise ConfigError(f"format={cfg.format!r}: expected one of {', '.join(FORMATS)} or all")
    path = find_checkpoint(cfg.ckpt, cfg.paths.log_dir)
    if not cfg.output_dir:
        raise ConfigError("output_dir=... is required: a directory that does not exist yet")
    formats = list(FORMATS) if cfg.format == "all" else [cfg.format]
    exporters = make_exporters(cfg, formats)
    model, tokenizer = load_checkpoint(path)
    if not isinstance(model, GPT2Model):
        raise ConfigError(
            f"ckpt={str(path)!r} holds a {type(model).__name__} (model=hf or model=module): export is written for "
            "gpt2lab's GPT-2 (model=gpt2, or model.init_from=<a GPT-2>)"
        )
    if tokenizer is None:
        raise ConfigError(f"ckpt={str(path)!r} carries no tokenizer, and every export holds one")
    log.info("Checkpoint: %s (%s parameters)", path, f"{model.num_parameters():,}")
    chat_template = exported_chat_template(path)
    root = check_output_dir(cfg.output_dir, cfg.overwrite)
    staging = root.with_name(root.name + ".partial")  # renamed to output_dir once every format is validated
    shutil.rmtree(staging, ignore_errors=True)
    results: dict[str, dict[str, Any]] = {}
    try:
        for fmt in formats:
            final = root / fmt if len(formats) > 1 else root
            directory = staging / fmt if len(formats) > 1 else staging
            directory.mkdir(parents=True)
            log.info("Exporting %s to %s", fmt, final)
            result = exporters[fmt].export(model, directory, tokenizer=tokenizer, chat_template=chat_template)
            if fmt != "hf":  # transformers' save_pretrained wrote these in its own form
                write_tokenizer(tokenizer, model.config.context_length, directory, chat_template)
                graph = {"file": Path(result["output_path"]).name, **graph_config(model, fmt, result)}
                chat = {"chat_template": chat_template.to_dict()} if chat_template else {}  # for gpt2lab serve onnx=
                write_weights(model, directory, {fmt: graph, **chat})
            result["output_path"] = str(final / Path(result["output_path"]).relative_to(directory))
            card = ModelCardGenerator(cfg.license).generate(
                model, final, fmt, checkpoint=path, export=result, chat_template=chat_template
            )
            (directory / "README.md").write_text(card)
            results[fmt] = result
        usual_modes(staging)
        if root.exists():  # overwrite=true: the old export goes once the new one is complete
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    output = Path(cfg.paths.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "export.json").write_text(json.dumps({"checkpoint": str(path), **results}, indent=2))
    return results


def exported_chat_template(path: Path) -> ChatTemplate | None:
    """The chat template of a ``data.format=chat`` run's checkpoint, which its exports carry (a Jinja
    ``chat_template``, the end-of-turn token as end of sequence, a chat prompt in the card); None for others."""
    saved = saved_chat_template(path)
    return ChatTemplate.from_dict(saved) if saved else None


def usual_modes(directory: Path) -> None:
    """Give every file and folder of ``directory`` the mode a new one gets here (0644 and 0755 under the usual
    umask): safetensors writes its weights 0600 (through a private temporary file), the rest came 0644."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def graph_config(model: Any, fmt: str, result: dict[str, Any]) -> dict[str, Any]:
    """What a runtime needs to know about the exported graph beside the architecture."""
    if fmt == "onnx":
        from gpt2lab.exporters.onnx import graph_shape

        return graph_shape(model) | {k: result[k] for k in ("opset_version", "optimize", "fp16", "quantize")}
    return {"method": result["method"]}


def summary(results: dict[str, dict[str, Any]]) -> str:
    """A table of the exports, then the speed table of each benchmarked one."""
    rows = [
        (fmt, r["output_path"], f"{r['file_size_mb']:,.1f} MB",
         "not validated" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2g}")
        for fmt, r in results.items()
    ]  # fmt: skip
    lines = [
        table(["format", "path", "size", "max abs diff"], rows, markdown=True, align=["left", "left", "right", "right"])
    ]
    for fmt, r in results.items():
        if r.get("benchmark"):
            lines += ["", format_benchmark(r["benchmark"], title=fmt)]
    return "\n".join(lines)
