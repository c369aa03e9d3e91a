"""``python -m gpt2lab.evaluate ckpt=...``: score a trained model on any data and split.

Loss, perplexity and bits per byte (the loss in bits spread over the UTF-8 bytes of the text: it does not
depend on the tokenizer, so models with different vocabularies compare), with what ``gzip -9``, ``bz2 -9``
and ``xz -9e`` achieve on the same bytes beside them. Loss and perplexity are over every scored token; bits per
byte leave out the predictions of end-of-text and the other special tokens, which stand for 0 bytes, since the
compressors see the decoded text without its document boundaries and pay nothing for them. Every token of the
text is scored once, its first after an end-of-text, whatever ``eval.stride``: strides differ only in the context
each token is predicted from. Any non-empty text can be scored, a single sentence too. With a task format
(``data.format``) only the scored tokens count: the summary loss of summarization pairs, the assistant turns of
chats, the completions of instructions; bits per byte are then over those tokens' text, and the compressors see
that text alone. Scoring runs through Lightning's test loop, so ``trainer=gpu``, bf16 and ``trainer=ddp`` apply as
in training. See docs/inference.md, "Evaluate".
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import execution_whitelist, instantiate
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from gpt2lab.checkpoint import find_checkpoint, load_checkpoint
from gpt2lab.config import (
    TRUSTED_TARGETS,
    given_on_command_line,
)
from gpt2lab.console import table
from gpt2lab.errors import ConfigError
from gpt2lab.lit.module import GPT2LitModule
from gpt2lab.lit.trainer import make_trainer
from gpt2lab.model import GPT2Model
from gpt2lab.tokenizers import TokenizerSpec

log = logging.getLogger("gpt2lab.evaluate")
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip -9": lambda data: gzip.compress(data, compresslevel=9),
    "bz2 -9": lambda data: bz2.compress(data, compresslevel=9),
    "xz -9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
}


class Evaluator:
    """Scores ``model`` on a dataloader of token windows (``GPT2DataModule.eval_dataloader``) through
    Lightning's test loop. Bits per byte need the ``tokenizer`` the windows were made with."""

    def __init__(
        self,
        model: GPT2Model,
        dataloader: DataLoader,
        device: str = "auto",
        tokenizer: Tokenizer | None = None,
        trainer: pl.Trainer | None = None,
    ) -> None:
        self.model, self.dataloader, self.tokenizer = model, dataloader, tokenizer
        self.trainer = trainer or pl.Trainer(
            accelerator=device, devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False
        )

    def evaluate(self) -> dict[str, Any]:
        """``loss``, ``perplexity``, ``bits_per_byte``, ``tokens``, ``bytes``, ``special_tokens`` (the predictions of
        0-byte tokens, end-of-text and the like, that bits per byte leave out), ``tokens_per_sec``."""
        module = GPT2LitModule(self.model.config, optimizer={})
        module.model, module.tokenizer = self.model, self.tokenizer
        started = time.perf_counter()
        self.trainer.test(module, dataloaders=self.dataloader, verbose=False)
        seconds = time.perf_counter() - started
        totals = module.eval_totals
        loss = totals["nats"] / totals["tokens"]
        return {
            "loss": loss,
            "perplexity": math.exp(loss),
            "bits_per_byte": totals["text_nats"] / (totals["bytes"] * math.log(2)) if self.tokenizer else None,
            "tokens": totals["tokens"],
            "bytes": totals["bytes"] if self.tokenizer else None,
            "special_tokens": totals["special_tokens"] if self.tokenizer else None,
            "tokens_per_sec": round(totals["tokens"] / seconds, 1),
        }


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    """Bits per byte that general-purpose compressors reach on ``data`` (Python's gzip, bz2 and lzma)."""
    return {name: 8 * len(compress(data)) / len(data) for name, compress in COMPRESSORS.items()} if data else {}


def print_metrics(metrics: dict[str, Any]) -> None:
    """Print ``Evaluator.evaluate``'s metrics (and ``compressors``, if added) as ``format_metrics`` does."""
    print(format_metrics(metrics))


def format_metrics(metrics: dict[str, Any]) -> str:
    """The metrics as a table: the model's bits per byte beside the compressors', and which predictions the
    model's leave out."""
    over = f" over {metrics['scored']} only" if metrics.get("format", "plain") != "plain" else ""
    lines = [
        f"loss {metrics['loss']:.4f}{over}   perplexity {metrics['perplexity']:.2f}   "
        f"{metrics['tokens']:,} tokens"
        + (f", {metrics['bytes']:,} bytes" if metrics.get("bytes") else "")
        + (f"   {metrics['tokens_per_sec']:,.0f} tokens/s" if metrics.get("tokens_per_sec") else ""),
    ]
    rows = {"model": metrics.get("bits_per_byte"), **metrics.get("compressors", {})}
    shown = [(name, f"{value:.3f}") for name, value in rows.items() if value is not None]
    lines += ["", table(["", "bits per byte"], shown, markdown=True, align=["left", "right"])]
    if metrics.get("bits_per_byte") is not None and metrics.get("special_tokens"):
        which = "end-of-text" if metrics.get("format", "plain") == "plain" else "special-token (end-of-text, <|end|>)"
        lines.append(
            f"The model's bits per byte leave out its {metrics['special_tokens']:,} {which} predictions (0 bytes each):"
            " the compressors see the same text, without boundaries."
        )
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` as ``conf/evaluate.yaml`` describes; writes ``eval.json`` to the run directory."""
    path = find_checkpoint(cfg.ckpt, cfg.paths.log_dir)
    model, tokenizer = load_checkpoint(path)
    if tokenizer is None:
        raise ConfigError(f"ckpt={str(path)!r} carries no tokenizer, so its text cannot be encoded")
    log.info("Checkpoint: %s (%s parameters)", path, f"{model.num_parameters():,}")
    if cfg.tokenizer is not None:
        log.warning("tokenizer=...: ignored; the model is evaluated with the tokenizer it was trained with")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output_dir / "tokenizer.json"))

    data_cfg = cfg.data if cfg.data is not None else run_data_config(path)
    split = cfg.split
    if cfg.data is not None and cfg.data.get("source") == "files" and not given_on_command_line("split"):
        # A file brought to be scored is scored whole: its "test split" would be the few documents that training
        # on it would have held out (data.test_split).
        split = "all"
        log.info("split=all: every document of data.path=%s (split=test: only those it holds out)", cfg.data.path)
    # split=all scores every document in its order, none held out: a text of a single sentence needs no validation
    # or test documents. Fractions given on the command line still split it (then all splits are scored).
    hold_out = split != "all" or given_on_command_line("data.val_split", "data.test_split")
    with execution_whitelist(TRUSTED_TARGETS):
        datamodule = instantiate(
            data_cfg,
            max_length=model.config.context_length,
            tokenizer=TokenizerSpec(kind="file", path=str(output_dir / "tokenizer.json")),
            hold_out=hold_out,
        )
        datamodule.setup("test")  # scoring: no split needs a full window of training
        dataloader = datamodule.eval_dataloader(split, cfg.eval.stride)
        callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
        trainer = make_trainer(cfg.trainer, logger=False, callbacks=callbacks, enable_checkpointing=False)
    metrics = Evaluator(model, dataloader, tokenizer=tokenizer, trainer=trainer).evaluate()
    scored = dataloader.dataset.scored_tokens()  # every token the windows score, in order
    if cfg.eval.compressors and trainer.is_global_zero:
        tokens = scored[: metrics["tokens"]]  # fewer only with trainer.limit_test_batches: the first ones
        text = tokenizer.decode(tokens.tolist(), skip_special_tokens=True).encode("utf-8")
        metrics["compressors"] = compressor_bits_per_byte(text)
    which = datamodule.format.scored  # which tokens the loss is over
    if metrics["tokens"] < len(scored):
        which = f"the first {metrics['tokens']:,} of {len(scored):,} tokens ({which}; trainer.limit_test_batches)"
    metrics |= {
        "checkpoint": str(path),
        "split": split,
        "stride": cfg.eval.stride,
        "format": datamodule.format.name,
        "scored": which,
        "data": datamodule.stats,
    }
    if trainer.is_global_zero:
        (output_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
        on = "all of the data" if split == "all" else f"the {split} split"
        log.info("Evaluation of %s on %s:\n%s", path, on, format_metrics(metrics))
        log.info("Saved %s", output_dir / "eval.json")
    return metrics


def run_data_config(checkpoint: Path) -> DictConfig:
    """The ``data`` config of the run that wrote ``checkpoint`` (``<run>/config.yaml``)."""
    run_config = checkpoint.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ConfigError(
            f"no data to evaluate on: {run_config} (the checkpoint's run config) is missing; "
            "name the data, e.g. data=files data.path=held_out.txt"
        )
    return OmegaConf.load(run_config).data
