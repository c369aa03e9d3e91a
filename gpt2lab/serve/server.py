"""The ``serve`` verb as a function of its config (``conf/serve.yaml``): the model's tokenizer, context and chat
template read here (the weights are loaded by LitServe's worker, ``api.py``), the settings checked, and LitServe
started with gpt2lab's OpenAI-compatible spec (``spec.py``). ``onnx=<dir>`` serves an ONNX export with onnxruntime:
nothing on that path imports torch. See docs/serving.md.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import litserve as ls
from omegaconf import DictConfig
from starlette.exceptions import HTTPException

from gpt2lab.errors import ConfigError
from gpt2lab.serve.api import GPT2LabAPI, ModelSource
from gpt2lab.serve.spec import OpenAICompatibleSpec, ServedModel, http_error

log = logging.getLogger("gpt2lab.serve")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_settings(cfg: DictConfig) -> None:
    """The numbers of ``serve.*`` and ``port`` in range, named by their keys, before any model is read."""
    checks = (
        ("port", cfg.port, 1, 65535),
        ("serve.max_batch_size", cfg.serve.max_batch_size, 1, 4096),
        ("serve.max_tokens", cfg.serve.max_tokens, 1, None),
        ("serve.max_n", cfg.serve.max_n, 1, None),
        ("serve.max_body_bytes", cfg.serve.max_body_bytes, 1024, None),
        ("serve.workers_per_device", cfg.serve.workers_per_device, 1, None),
    )
    for key, value, low, high in checks:
        if value < low or (high is not None and value > high):
            raise ConfigError(
                f"{key}={value}: expected {low} to {high}" if high else f"{key}={value}: expected >= {low}"
            )
    if cfg.serve.top_k is not None and cfg.serve.top_k < 1:
        raise ConfigError(f"serve.top_k={cfg.serve.top_k}: expected at least 1, or null for no limit")
    if not cfg.serve.model_name:
        raise ConfigError("serve.model_name is empty: name the model clients ask for, e.g. serve.model_name=gpt2lab")


def check_port(host: str, port: int) -> None:
    """The address can be listened on: a port in use fails here, by name, not after the model has loaded."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise ConfigError(
            f"port={port} on host={host} cannot be listened on ({e.strerror}): stop what uses it, or give port=<another>"
        ) from None


def served_model(cfg: DictConfig) -> tuple[ServedModel, ModelSource]:
    """What the HTTP process needs of the model, and where the worker loads it from."""
    settings = cfg.serve
    if cfg.onnx is not None:
        if cfg.ckpt is not None:
            raise ConfigError("give ckpt=... or onnx=..., not both")
        from gpt2lab.inference.onnx import export_config  # numpy and onnxruntime only

        path = Path(cfg.onnx).expanduser()
        config = export_config(path)
        tokenizer_json, context = (path / "tokenizer.json").read_text(), config["gpt2lab"]["context_length"]
        template, device = config.get("chat_template"), "cpu"
    else:
        from gpt2lab.checkpoint import find_checkpoint, read_checkpoint, read_payload
        from gpt2lab.inference.generator import usable_device
        from gpt2lab.model.adapter import is_gpt2

        if cfg.device != "auto":  # auto: the GPU LitServe gives each worker
            usable_device(cfg.device)
        path = find_checkpoint(cfg.ckpt, cfg.paths.log_dir)
        checkpoint = read_checkpoint(path)  # memory-mapped: the weights are not read here
        spec = checkpoint["hyper_parameters"]["model"]
        if not is_gpt2(spec):
            raise ConfigError(
                f"ckpt={str(path)!r} holds a model=hf or model=module model: gpt2lab serve decodes gpt2lab's GPT-2 "
                "(with its KV cache); serve that model's own export with vLLM instead (docs/serving.md)"
            )
        payload = read_payload(checkpoint)
        if payload.tokenizer is None:
            raise ConfigError(f"ckpt={str(path)!r} carries no tokenizer, so prompts cannot be encoded")
        tokenizer_json, context = payload.tokenizer.to_str(), spec["context_length"]
        template, device = payload.chat_template, cfg.device
    model = ServedModel(
        settings.model_name, tokenizer_json, context, template, settings.max_tokens, settings.max_n,
        settings.max_body_bytes,
    )  # fmt: skip
    onnx = cfg.onnx is not None
    source = ModelSource(None if onnx else str(path), str(path) if onnx else None, device, settings.max_batch_size,
                         settings.top_k)  # fmt: skip
    return model, source


def build_server(cfg: DictConfig) -> tuple[ls.LitServer, ServedModel, ModelSource]:
    """The LitServer ``conf/serve.yaml`` describes, not yet started."""
    check_settings(cfg)
    check_port(cfg.host, cfg.port)
    model, source = served_model(cfg)
    api = GPT2LabAPI(source, OpenAICompatibleSpec(model), cfg.serve.api_key or None)
    if source.onnx is not None or source.device == "cpu":
        accelerator = "cpu"
    else:
        accelerator = "auto" if source.device == "auto" else "cuda"
    server = ls.LitServer(
        api, accelerator=accelerator, devices=cfg.serve.devices, workers_per_device=cfg.serve.workers_per_device,
        timeout=False,
    )  # fmt: skip
    server.app.add_exception_handler(HTTPException, http_error)
    return server, model, source


def serve(cfg: DictConfig) -> None:
    """Serve until stopped (Ctrl-C)."""
    server, model, source = build_server(cfg)
    if cfg.host not in LOCAL_HOSTS:
        unguarded = (
            "" if cfg.serve.api_key else ", and with no API key (serve.api_key) anyone who reaches it can use it"
        )
        log.warning("host=%s: the server is reachable from other machines%s", cfg.host, unguarded)
    what = f"onnx={source.onnx}" if source.onnx else f"ckpt={source.ckpt}"
    log.info(
        "Serving %s as %r at http://%s:%d/v1 (completions, chat/completions, models; /health), %d rows decoded "
        "together%s",
        what, model.name, cfg.host, cfg.port, source.rows, ", API key required" if cfg.serve.api_key else "",
    )  # fmt: skip
    server.run(host=cfg.host, port=cfg.port, generate_client_file=False, log_level=cfg.serve.log_level)
