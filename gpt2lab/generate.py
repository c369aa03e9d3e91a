"""``python -m gpt2lab.generate ckpt=... prompt="..."``: continue text with a trained model.

Prompts come from ``prompt=`` or ``prompts_file=`` (one per line) and are decoded together, left-padded,
with the KV cache of ``gpt2lab/model/generation.py``; settings are the ``inference`` group's. One sequence
streams to the terminal as it is produced; ``output=samples.jsonl`` keeps every completion. See README,
"Generate".
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from gpt2lab.checkpoint import find_checkpoint, load_checkpoint
from gpt2lab.config import TRUSTED_TARGETS, config_path, literal_overrides, null_group_overrides, register_schemas
from gpt2lab.errors import ConfigError, report_errors
from gpt2lab.model import GPT2Model
from gpt2lab.tokenizers import EOS_TOKEN

log = logging.getLogger("gpt2lab.generate")
PROMPTS_PER_BATCH = 16


def check_inference(settings: Mapping[str, Any]) -> None:
    """Decoding settings in range, naming the key (``inference.*``)."""
    checks = (
        ("max_new_tokens", lambda v: v >= 1, "at least 1"),
        ("num_return_sequences", lambda v: v >= 1, "at least 1"),
        ("top_k", lambda v: v is None or v >= 1, "at least 1, or null for no limit"),
        ("top_p", lambda v: v is None or 0 < v <= 1, "in (0, 1] (1: no nucleus cut)"),
        ("repetition_penalty", lambda v: v > 0, "positive (1.0: no penalty)"),
    )
    for key, ok, expected in checks:
        if key in settings and not ok(settings[key]):
            raise ConfigError(f"inference.{key}={settings[key]}: expected {expected}")
    if settings.get("do_sample", True) and not settings.get("temperature", 1.0) > 0:
        raise ConfigError(
            f"inference.temperature={settings.get('temperature')}: expected > 0 when sampling "
            "(inference.do_sample=false decodes greedily)"
        )


class TextGenerator:
    """A trained model and its tokenizer, ready to continue text. ``model_path`` is what ``ckpt=`` takes:
    a ``.ckpt`` file, a run directory (its best checkpoint), ``last`` or ``best`` (of ``log_dir``)."""

    def __init__(self, model_path: str, device: str = "auto", log_dir: str = "outputs") -> None:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.path = find_checkpoint(model_path, log_dir)
        model, tokenizer = load_checkpoint(self.path, device=device)
        if tokenizer is None:
            raise ConfigError(f"ckpt={str(self.path)!r} carries no tokenizer, so prompts cannot be encoded")
        self.model, self.tokenizer = model, tokenizer

    def generate_text(
        self, prompt: str | list[str], config: Mapping[str, Any], out: TextIO | None = sys.stdout
    ) -> list[str]:
        """Completions of ``prompt`` (``num_return_sequences`` per prompt, in order). A single sequence
        streams to ``out`` as it is produced when ``config['stream']``."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        completions = []
        for start in range(0, len(prompts), PROMPTS_PER_BATCH):
            batch = prompts[start : start + PROMPTS_PER_BATCH]
            completions += complete(self.model, self.tokenizer, batch, config, out=out)
        return completions

    def interactive_mode(self, config: Mapping[str, Any]) -> None:
        """Talk to the model in the terminal, as ``python -m gpt2lab.chat`` does."""
        from gpt2lab.chat import repl

        repl(self, dict(config))


def complete(
    model: GPT2Model, tokenizer: Tokenizer, prompts: list[str], config: Mapping[str, Any], out: TextIO | None = None
) -> list[str]:
    """Continue each prompt, ``num_return_sequences`` times; a completion ends at end-of-text, at one of the
    ``stop`` strings (which it then ends before), or after ``max_new_tokens``."""
    settings = dict(config)
    check_inference(settings)
    if any(not p for p in prompts):
        raise ConfigError("the prompt is empty: give the model some text to continue (prompt=... or prompts_file=...)")
    stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in settings.get("stop") or [] if s]  # "\n": newline
    encoded = [tokenizer.encode(p).ids for p in prompts]
    width = max(len(ids) for ids in encoded)
    device = model.wte.weight.device
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(encoded):  # left padding: every prompt ends where decoding starts
        input_ids[row, width - len(ids) :] = torch.tensor(ids, device=device)
        mask[row, width - len(ids) :] = 1
    eos = tokenizer.token_to_id(EOS_TOKEN)
    n = settings.get("num_return_sequences", 1)
    rows: list[list[int]] = [[] for _ in range(len(prompts) * n)]
    texts, done = [""] * len(rows), [False] * len(rows)
    streaming = out is not None and settings.get("stream", True) and len(rows) == 1
    shown = 0
    tokens = model.generate_stream(
        input_ids, settings["max_new_tokens"], settings.get("temperature", 1.0), settings.get("top_k"),
        top_p=settings.get("top_p"), repetition_penalty=settings.get("repetition_penalty", 1.0),
        do_sample=settings.get("do_sample", True), attention_mask=mask, eos_token_id=eos,
        num_return_sequences=n, seed=settings.get("seed"),
    )  # fmt: skip
    for step in tokens:
        for row, token in enumerate(step.tolist()):
            if done[row]:
                continue
            if token == eos:
                done[row] = True
                continue
            rows[row].append(token)
            texts[row] = tokenizer.decode(rows[row])
            hit = min((texts[row].find(s) for s in stops if s in texts[row]), default=-1)
            if hit >= 0:
                texts[row], done[row] = texts[row][:hit], True
        if streaming and not texts[0].endswith("\ufffd"):  # not in the middle of a multi-byte character
            out.write(texts[0][shown:])
            out.flush()
            shown = len(texts[0])
        if all(done):
            break
    if streaming:
        out.write(texts[0][shown:] + "\n")
    return texts


def sample_text(
    model: GPT2Model, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None
) -> str:
    """The prompt and a short sampled continuation (seed 0): the sample printed at the end of training."""
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": 0}
    return prompt + complete(model, tokenizer, [prompt or EOS_TOKEN], settings)[0]


def read_prompts(cfg: DictConfig) -> list[str]:
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


def generate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Generate as ``conf/generate.yaml`` describes; returns the samples written to ``output``."""
    settings = OmegaConf.to_container(cfg.inference, resolve=True)
    check_inference(settings)
    prompts = read_prompts(cfg)
    generator = TextGenerator(cfg.ckpt, cfg.device, cfg.paths.log_dir)
    log.info("Checkpoint: %s", generator.path)
    single = len(prompts) * settings["num_return_sequences"] == 1
    if single and settings["stream"]:
        print(prompts[0], end="", flush=True)  # the completion streams after it
    completions = generator.generate_text(prompts, settings, out=sys.stdout if single else None)
    n = settings["num_return_sequences"]
    samples = [
        {"prompt": prompts[i // n], "completion": text, "sequence": i % n, "checkpoint": str(generator.path)}
        for i, text in enumerate(completions)
    ]
    if not single or not settings["stream"]:
        for sample in samples:
            print(f"--- {sample['prompt']!r} [{sample['sequence']}]\n{sample['prompt']}{sample['completion']}")
    if cfg.output:
        with open(cfg.output, "a") as f:
            for sample in samples:
                f.write(json.dumps(sample | {"settings": settings}) + "\n")
        log.info("Appended %d samples to %s", len(samples), cfg.output)
    return samples


register_schemas()


def main() -> None:
    """Entry point of ``python -m gpt2lab.generate``."""
    sys.argv = literal_overrides(null_group_overrides(sys.argv), ("prompt",))
    _main()


@hydra.main(config_path=config_path(), config_name="generate", execution_whitelist=TRUSTED_TARGETS)
@report_errors
def _main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
