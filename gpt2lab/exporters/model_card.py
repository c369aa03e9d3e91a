"""The ``README.md`` of an export directory: a Hugging Face model card (YAML front matter, then sections) written
from what the training run left behind: ``config.yaml``, ``train.log``, ``results.json`` and any ``eval.json``
of ``python -m gpt2lab.evaluate`` on the same checkpoint. The usage snippets name the directory by its absolute
path, so that they run as pasted on the machine that exported it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from gpt2lab.console import table
from gpt2lab.exporters.card_text import (
    CHAT_MESSAGE,
    CITATION,
    FILES,
    FORMAT_NAMES,
    HF_CHAT_USAGE,
    HF_USAGE,
    LIMITATIONS,
    ONNX_USAGE,
    TORCHSCRIPT_USAGE,
)
from gpt2lab.model import GPT2Model

if TYPE_CHECKING:
    from gpt2lab.tokenizers.chat_template import ChatTemplate

# The config sections that describe how the model was trained (the rest is paths, logging and callbacks).
PROCEDURE_SECTIONS = ("optimizer", "scheduler", "tokenizer")
TRAINER_KEYS = ("max_steps", "max_epochs", "precision", "accumulate_grad_batches", "gradient_clip_val", "devices")
DATA_KEYS = ("source", "path", "name", "config_name", "batch_size", "max_length", "val_split", "test_split", "seed")
DETAIL_KEYS = ("opset_version", "optimize", "fp16", "quantize", "method", "max_abs_diff")  # of an export's result
# What makes two data configs the same documents in the same splits
DATA_IDENTITY = ("source", "path", "name", "config_name", "text_column", "sample_by", "val_split", "test_split",
                 "split_seed", "min_length", "remove_duplicates", "format")  # fmt: skip
RESULT_COLUMNS = ["data", "split", "stride", "tokens", "measured by", "loss (nats/token)", "perplexity",
                  "bits per byte"]  # fmt: skip


class ModelCardGenerator:
    """``generate(model, directory, kind, checkpoint=...)`` returns the card's text; ``kind`` is ``hf``, ``onnx``
    or ``torchscript``: what the directory holds, which decides the library and the snippets. A chat model
    (``chat_template``) gets a chat prompt in its snippets."""

    def __init__(self, license: str = "mit") -> None:
        self.license = license

    def generate(
        self,
        model: GPT2Model,
        directory: str | Path,
        kind: str,
        checkpoint: str | Path | None = None,
        export: dict[str, Any] | None = None,
        name: str | None = None,
        chat_template: ChatTemplate | None = None,
    ) -> str:
        directory = Path(directory).resolve()
        run = RunRecord(Path(checkpoint)) if checkpoint else RunRecord(None)
        what = "chat model" if chat_template else "language model"
        sections = [
            self._front_matter(kind, run, chat_template),
            f"# {name or title(model, run, chat_template)}\n\n"
            f"A GPT-2 {what} trained with gpt2lab, exported as {FORMAT_NAMES[kind]}.",
            self._details(model, run, kind, export or {}, chat_template),
            self._training_data(run),
            self._procedure(run),
            evaluation(run, model.config.context_length),
            self._usage(model, directory, kind, chat_template),
            LIMITATIONS,
            CITATION,
        ]
        return "\n\n".join(s.strip() for s in sections if s) + "\n"

    def _front_matter(self, kind: str, run: RunRecord, chat_template: ChatTemplate | None) -> str:
        tags = ["gpt2lab", "gpt2", "text-generation", *({"hf": [], "onnx": ["onnx"]}.get(kind, ["torchscript"]))]
        meta = {
            "license": self.license,
            "library_name": {"hf": "transformers", "onnx": "onnx", "torchscript": "pytorch"}[kind],
            "pipeline_tag": "text-generation",
            "tags": tags + (["conversational"] if chat_template else []),
            # The Hub's dataset ids only: a file or the bundled corpus is named under "Training data"
            "datasets": [run.hub_dataset] if run.hub_dataset else [],
            "metrics": ["perplexity", "bits-per-byte"],
        }
        return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"

    def _details(
        self, model: GPT2Model, run: RunRecord, kind: str, export: dict[str, Any], chat: ChatTemplate | None
    ) -> str:
        c = model.config
        rows = {
            "architecture": f"GPT-2 decoder: {c.num_layers} layers, width {c.d_model}, {c.num_heads} heads, "
            f"MLP {c.d_ff}, pre-LayerNorm, learned positions, tied input/output embeddings"
            + ("" if c.use_bias else ", no biases"),
            "parameters": f"{model.num_parameters():,}",
            "vocabulary": f"{c.vocab_size:,} tokens",
            "context": f"{c.context_length:,} tokens",
        }
        if chat:
            roles = ", ".join(f"`{token}`" for token in chat.roles.values())
            rows["chat template"] = f"{chat.name}: {roles}; a turn ends at `{chat.end}` (the end-of-sequence token)"
        if run.checkpoint:
            rows["checkpoint"] = f"`{run.checkpoint.name}`" + (f", step {run.step:,}" if run.step is not None else "")
        rows |= {k.replace("_", " "): f"{v:.2g}" if isinstance(v, float) else str(v)
                 for k, v in export.items() if k in DETAIL_KEYS and v is not None}  # fmt: skip
        return "## Model details\n\n" + pairs(rows) + "\n\n" + FILES[kind]

    def _training_data(self, run: RunRecord) -> str:
        if not run.config:
            return "## Training data\n\nNot recorded: the checkpoint's run directory has no config.yaml."
        data = run.config.get("data") or {}
        rows = {"dataset": run.dataset or "unknown"}
        rows |= {f"data.{k}": str(data[k]) for k in DATA_KEYS if data.get(k) is not None}
        rows |= {f"{split} split": f"{n:,} tokens" for split, n in run.tokens.items()}
        if run.tokens_seen:
            rows["tokens trained on"] = f"{run.tokens_seen:,} ({run.step:,} steps)"
        rows["corpus fingerprint"] = f"`{run.fingerprint}`" if run.fingerprint else "not recorded (no train.log)"
        return "## Training data\n\n" + pairs(rows)

    def _procedure(self, run: RunRecord) -> str:
        if not run.config:
            return ""
        resolved = {k: run.config[k] for k in PROCEDURE_SECTIONS if run.config.get(k)}
        resolved["trainer"] = {k: v for k, v in (run.config.get("trainer") or {}).items() if k in TRAINER_KEYS}
        resolved |= {k: run.config[k] for k in ("seed", "compile") if k in run.config}
        text = "## Training procedure\n\nThe resolved hyper-parameters (from the run's `config.yaml`):\n\n"
        text += "```yaml\n" + yaml.safe_dump(resolved, sort_keys=False) + "```"
        if run.results.get("global_step") is not None:
            text += f"\n\n{run.results['global_step']:,} optimizer steps"
            if run.results.get("duration_s"):
                text += f" in {run.results['duration_s']:,.0f} s ({run.results.get('tokens_per_sec', 0):,.0f} tokens/s)"
            text += "."
        return text

    def _usage(self, model: GPT2Model, directory: Path, kind: str, chat: ChatTemplate | None) -> str:
        c = model.config
        head_dim = c.d_model // c.num_heads
        # A chat model is prompted with a conversation in its template, a plain one with text to continue
        prompt = repr(chat.prompt([{"role": "user", "content": CHAT_MESSAGE}])) if chat else '"def"'
        snippets = {
            "hf": (HF_CHAT_USAGE if chat else HF_USAGE).format(directory=directory, message=CHAT_MESSAGE),
            "onnx": ONNX_USAGE.format(
                directory=directory, layers=c.num_layers, heads=c.num_heads, head_dim=head_dim, prompt=prompt
            ),
            "torchscript": TORCHSCRIPT_USAGE.format(directory=directory, prompt=prompt),
        }
        gpt2lab = {
            "hf": "```bash\ngpt2lab train model.init_from={directory}   # fine-tune it in gpt2lab\n```",
            "onnx": '```bash\npython -m gpt2lab.generate onnx={directory} prompt="def"   # onnxruntime: '
            "no PyTorch needed\n```",
            "torchscript": "",
        }[kind].format(directory=directory)
        return "## How to use\n\n" + (f"With gpt2lab:\n\n{gpt2lab}\n\n" if gpt2lab else "") + snippets[kind]


def title(model: GPT2Model, run: RunRecord, chat: ChatTemplate | None) -> str:
    """What the card calls the model: gpt2lab's GPT-2 and its size, its data and recipe (experiment or preset),
    after the run's name where the user named its directory (not the time it started)."""
    text = f"gpt2lab GPT-2 ({short_count(model.num_parameters())})" + (" chat model" if chat else "")
    text += f" trained on {run.dataset}" if run.dataset else ""
    text += f" ({run.recipe})" if run.recipe else ""
    named = run.dir is not None and not re.fullmatch(r"\d+|\d\d-\d\d-\d\d", run.dir.name)
    return f"{run.dir.name}: {text}" if named and run.dir else text


def short_count(n: int) -> str:
    """124M, 0.9M, 28K, 1.5B: a parameter count as model names give it."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size or (unit == "M" and n >= 0.1 * size):
            value = n / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return str(n)


def evaluation(run: RunRecord, context: int) -> str:
    """The checkpoint's results: first those on the documents its run held out (the run's own validation and
    test, and ``gpt2lab.evaluate`` on those splits), then apart the rest (other data, the training split), each
    row naming its data, split, stride and tokens. An evaluation run again with the same settings is listed
    once, with its latest numbers."""
    windows = f"none (windows of {context:,})"
    held_out, evaluations = run_results(run, windows), {}
    for e in run.evaluations:  # oldest first: a later run of the same evaluation replaces an earlier one
        if e.get("loss") is None:
            continue
        directory = Path(e["directory"])
        given = read_yaml(directory / ".hydra" / "config.yaml").get("data")  # None: the run's own data
        own = given is None or same_data(given, hydra_record(directory).get("runtime", {}).get("cwd"), run)
        split = e.get("split") or "?"
        result = (
            data_name(given) if given else run.dataset or "the run's data",
            "all (every document)" if split == "all" else split,
            windows if e.get("stride") is None else f"{e['stride']:,}",
            f"{e['tokens']:,}" if isinstance(e.get("tokens"), int) else "?",
            "gpt2lab.evaluate",
            e["loss"], e.get("perplexity"), e.get("bits_per_byte"),
        )  # fmt: skip
        evaluations[(own and split in ("validation", "test"), *result[:4])] = result
    held_out += [r for key, r in evaluations.items() if key[0]]
    rest = [r for key, r in evaluations.items() if not key[0]]
    note = ""
    if (run.results.get("metrics") or {}) and not run.measured and run.checkpoint:
        note = (
            f"The training run's results are those of its best checkpoint (step {run.best_step}), not of this "
            f"one (step {run.step}): `python -m gpt2lab.evaluate ckpt={run.checkpoint}` measures it, and the "
            "next export lists that here."
        )
    text = "## Evaluation results"
    if not held_out and not rest:
        return f"{text}\n\n" + (note or "No evaluation was recorded for this checkpoint.")
    if held_out:
        text += f"\n\nOn the documents the training run held out of {run.dataset or 'its data'}:\n\n"
        text += results_table(held_out)
    if note:
        text += f"\n\n{note}"
    if rest:
        text += (
            "\n\n### Other evaluations\n\nOn other data, or on documents the model was trained on: not its held-out "
            "results, and not comparable with them.\n\n" + results_table(rest)
        )
    return text


def run_results(run: RunRecord, windows: str) -> list[tuple[Any, ...]]:
    """The training run's own validation and test results, when they measured this checkpoint: the test split
    its best one (train.py tests the best one), the validation split its last validation (the best one's too
    when their losses agree). Another checkpoint of the run gets only its own evaluations."""
    metrics, best = run.results.get("metrics") or {}, run.results.get("best_val_loss")
    if not run.measured:
        return []
    data, rows = run.dataset or "the run's data", []
    if metrics.get("val/loss") is not None and (best is None or metrics["val/loss"] == best):
        loss, ppl, bpb = metrics["val/loss"], metrics.get("val/ppl"), metrics.get("val/bpb")
        rows.append((data, "validation", windows, run.eval_tokens("validation"), "training run", loss, ppl, bpb))
    elif best is not None:
        rows.append((data, "validation", windows, run.eval_tokens("validation"), "training run (best validation)",
                     best, math.exp(best), None))  # fmt: skip
    if metrics.get("test/loss") is not None:
        loss, ppl, bpb = metrics["test/loss"], metrics.get("test/ppl"), metrics.get("test/bpb")
        rows.append((data, "test", windows, run.eval_tokens("test"), "training run", loss, ppl, bpb))
    return rows


def results_table(rows: list[tuple[Any, ...]]) -> str:
    """Rows of (data, split, stride, tokens, measured by, loss, perplexity, bits per byte) as a Markdown table."""
    shown = [
        [*r[:5], f"{r[5]:.4f}", "" if r[6] is None else f"{r[6]:.2f}", "" if r[7] is None else f"{r[7]:.4f}"]
        for r in rows
    ]
    return table(RESULT_COLUMNS, shown, markdown=True, align=["left"] * 5 + ["right"] * 3)


def pairs(rows: dict[str, str]) -> str:
    """A two-column Markdown table of names and values, without a header."""
    return table(["", ""], rows.items(), markdown=True)


class RunRecord:
    """What the run that wrote a checkpoint recorded (``<run>/checkpoints/<name>.ckpt``); empty without one."""

    def __init__(self, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        run = checkpoint.parent.parent if checkpoint else None
        self.dir = run if run and (run / "config.yaml").is_file() else None
        self.config = yaml.safe_load((run / "config.yaml").read_text()) if self.dir else {}
        self.results = read_json(run / "results.json") if self.dir else {}
        log = (run / "train.log").read_text(errors="replace") if self.dir and (run / "train.log").is_file() else ""
        found = re.findall(r"\(fingerprint ([0-9a-f]+)\)", log)
        self.fingerprint = found[-1] if found else None
        self.tokens = {
            s: int(n)
            for s, n in re.findall(r"- (train|validation|test) +\d+ documents +\d+ characters +(\d+) tokens", log)
        }
        self.step = step_of(checkpoint, self.results.get("global_step")) if checkpoint else None
        best = self.results.get("best_checkpoint")
        self.best_step = step_of(Path(best), None) if best else self.results.get("global_step")
        # Whether the run's own metrics measured these weights (the best checkpoint's step; last.ckpt at that step)
        self.measured = self.step is not None and self.step == self.best_step
        # Evaluations of this very checkpoint: eval.json files of python -m gpt2lab.evaluate under the log directory.
        log_dir = Path((self.config.get("paths") or {}).get("log_dir") or "outputs")
        found = sorted(log_dir.glob("evaluate/**/eval.json")) if checkpoint and log_dir.is_dir() else []
        self.evaluations = [
            e | {"directory": str(path.parent)}
            for path, e in zip(found, map(read_json, found), strict=True)
            if e.get("checkpoint") == str(checkpoint)
        ]
        # What Hydra recorded of a command-line run: the recipe chosen, the directory it ran in
        hydra = hydra_record(run) if self.dir else {}
        choices = hydra.get("runtime", {}).get("choices") or {}
        self.recipe = next((f"{g} {choices[g]}" for g in ("experiment", "preset") if choices.get(g)), None)
        self.cwd = hydra.get("runtime", {}).get("cwd")

    @property
    def tokens_seen(self) -> int | None:
        """Steps x batch x window x accumulation x devices: the tokens the optimizer saw."""
        data, trainer = self.config.get("data") or {}, self.config.get("trainer") or {}
        factors = [self.step, data.get("batch_size"), data.get("max_length")]
        if not all(isinstance(f, int) for f in factors):
            return None
        devices = trainer.get("devices") if isinstance(trainer.get("devices"), int) else 1
        return factors[0] * factors[1] * factors[2] * (trainer.get("accumulate_grad_batches") or 1) * devices

    @property
    def dataset(self) -> str | None:
        return data_name(self.config.get("data") or {})

    @property
    def hub_dataset(self) -> str | None:
        """The Hub dataset the run trained on (the card's front matter names Hub ids only)."""
        data = self.config.get("data") or {}
        return data.get("name") if data.get("source") == "hub" else None

    def eval_tokens(self, split: str) -> str:
        """How many tokens the run's own score of ``split`` covers: the whole split, or the batches that
        ``trainer.limit_val_batches`` / ``limit_test_batches`` let it score, named."""
        stage = "val" if split == "validation" else "test"
        counted = (self.results.get("metrics") or {}).get(f"{stage}/tokens")  # logged by the run since issue 27
        key = f"limit_{stage}_batches"
        limit = (self.config.get("trainer") or {}).get(key)
        if limit is None or (isinstance(limit, float) and limit >= 1):
            whole = counted or self.tokens.get(split)
            return f"{int(whole):,}" if whole else "the whole split"
        if isinstance(limit, float):
            subset = f"{limit:.0%} of the split (trainer.{key}={limit})"
            return f"{int(counted):,}, {subset}" if counted else subset
        batches = f"{limit} batch{'es' if limit != 1 else ''} (trainer.{key}={limit})"
        if counted:
            return f"{int(counted):,}, {batches}"
        data = self.config.get("data") or {}
        size, length = data.get("eval_batch_size") or data.get("batch_size"), data.get("max_length")
        if data.get("format", "plain") != "plain" or not isinstance(size, int) or not isinstance(length, int):
            return batches  # a task format scores the answers' tokens only: a count the config does not give
        return f"{min(limit * size * length, self.tokens.get(split, limit * size * length)):,}, {batches}"


def data_name(data: dict[str, Any]) -> str | None:
    """A data config's name for people: the Hub dataset (and its configuration), the file, or the source."""
    if data.get("name"):
        return data["name"] + (f" ({data['config_name']})" if data.get("config_name") else "")
    return Path(data["path"]).name if data.get("path") else data.get("source")


def same_data(data: dict[str, Any], cwd: str | None, run: RunRecord) -> bool:
    """Whether ``data`` (an evaluation's, given on its command line in ``cwd``) is the run's own, split alike:
    then its validation and test splits are the documents the run held out."""

    def identity(d: dict[str, Any], at: str | None) -> dict[str, Any]:
        found = {k: d.get(k) for k in DATA_IDENTITY}
        if found["path"]:
            found["path"] = str(Path(at or ".", found["path"]))  # a relative path, from where that command ran
        return found

    return identity(data, cwd) == identity(run.config.get("data") or {}, run.cwd)


def hydra_record(directory: Path) -> dict[str, Any]:
    """``hydra:`` of ``<directory>/.hydra/hydra.yaml`` (what a command-line run recorded), or empty."""
    return read_yaml(directory / ".hydra" / "hydra.yaml").get("hydra") or {}


def step_of(checkpoint: Path, default: int | None) -> int | None:
    """The optimizer step in a checkpoint's name (``step000040-val_loss5.1.ckpt``), else ``default``."""
    match = re.search(r"step(\d+)", checkpoint.name)
    return int(match.group(1)) if match else default


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
