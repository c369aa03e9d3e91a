"""The ``generate`` verb as a function of its config (``conf/generate.yaml``): the prompts read, the model loaded
(a checkpoint, ``ckpt=``, or an ONNX export, ``onnx=``), the completions printed and appended to ``output=``.

Prompts come from ``prompt=`` or ``prompts_file=`` (one per line) and are decoded together, in batches; settings
are the ``inference`` group's. One sequence streams to the terminal as it is produced. ``onnx=<dir>`` decodes with
onnxruntime (``gpt2lab.inference.onnx``), also where PyTorch is not installed: nothing imported here imports torch.
See docs/inference.md, "Generate", and docs/import-export.md, "Export".
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpt2lab.errors import ConfigError
from gpt2lab.inference.generator import TextGenerator, check_inference

log = logging.getLogger("gpt2lab.generate")


def read_prompts(cfg: DictConfig) -> list[str]:
    """The prompts of ``prompt=`` or ``prompts_file=`` (one per line, blank lines skipped)."""
    if cfg.prompt is not None and cfg.prompts_file is not None:
        raise ConfigError("give prompt=... or prompts_file=..., not both")
    if cfg.prompts_file is None:
        if cfg.prompt is None:
            raise ConfigError('no prompt: give prompt="..." or prompts_file=<a text file, one prompt per line>')
        return [str(cfg.prompt)]
    path = Path(cfg.prompts_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts_file={cfg.prompts_file!r}: no such file (a text file, one prompt per line)")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts_file={cfg.prompts_file!r} has no prompts: write one prompt per line")
    return prompts


def check_output(path: Path) -> None:
    """``output=`` can be appended to: its directory is made now, before any time is spent generating."""
    if path.is_dir():
        raise ConfigError(f"output={str(path)!r} is a directory: name a file, e.g. output={path / 'samples.jsonl'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.open("a").close()
    except OSError as e:
        raise ConfigError(
            f"output={str(path)!r} cannot be written ({e.strerror}): name a file in a writable directory"
        ) from None


def load_generator(cfg: DictConfig) -> TextGenerator:
    """The generator of ``ckpt=`` (PyTorch) or of ``onnx=`` (onnxruntime, no PyTorch needed)."""
    if cfg.onnx is None:
        return TextGenerator(cfg.ckpt, cfg.device, cfg.paths.log_dir)
    if cfg.ckpt is not None:
        raise ConfigError("give ckpt=... or onnx=..., not both")
    from gpt2lab.inference.onnx import ONNXTextGenerator  # onnxruntime and numpy only

    return ONNXTextGenerator(cfg.onnx)


def generate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Generate as ``conf/generate.yaml`` describes: a single completion streams to stdout after its prompt,
    several are printed when done. Returns the samples (also appended to ``output``, when given)."""
    settings = OmegaConf.to_container(cfg.inference, resolve=True)
    check_inference(settings)
    prompts = read_prompts(cfg)
    if cfg.output:
        check_output(Path(cfg.output).expanduser())
    generator = load_generator(cfg)
    log.info("Model: %s", generator.path)
    n = settings["num_return_sequences"]
    single = len(prompts) * n == 1
    if single and settings["stream"]:
        print(prompts[0], end="", flush=True)  # the completion streams after it
    completions = generator.generate_text(prompts, settings, out=sys.stdout if single else None)
    samples = [
        {"prompt": prompts[i // n], "completion": text, "sequence": i % n, "checkpoint": str(generator.path)}
        for i, text in enumerate(completions)
    ]
    if not single or not settings["stream"]:
        for sample in samples:
            print(f"--- {sample['prompt']!r} [{sample['sequence']}]\n{sample['prompt']}{sample['completion']}")
    if cfg.output:
        with Path(cfg.output).expanduser().open("a") as f:
            for sample in samples:
                f.write(json.dumps(sample | {"settings": settings}) + "\n")
        log.info("Appended %d samples to %s", len(samples), cfg.output)
    return samples
