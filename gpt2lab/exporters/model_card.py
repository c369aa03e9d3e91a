"""The ``README.md`` of an export directory: a Hugging Face model card (YAML front matter, then sections) written
from what the training run left behind: ``config.yaml``, ``train.log``, ``results.json`` and any ``eval.json``
of ``python -m gpt2lab.evaluate`` on the same checkpoint. The usage snippets name the directory by its absolute
path, so that they run as pasted on the machine that exported it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from gpt2lab.model import GPT2Model

# The config sections that describe how the model was trained (the rest is paths, logging and callbacks).
PROCEDURE_SECTIONS = ("optimizer", "scheduler", "tokenizer")
TRAINER_KEYS = ("max_steps", "max_epochs", "precision", "accumulate_grad_batches", "gradient_clip_val", "devices")
DATA_KEYS = ("source", "path", "name", "config_name", "batch_size", "max_length", "val_split", "test_split", "seed")
EVAL_METRICS = {"loss": "loss (nats/token)", "ppl": "perplexity", "perplexity": "perplexity", "bpb": "bits per byte",
                "bits_per_byte": "bits per byte"}  # fmt: skip


class ModelCardGenerator:
    """``generate(model, directory, kind, checkpoint=...)`` returns the card's text; ``kind`` is ``hf``, ``onnx``
    or ``torchscript``: what the directory holds, which decides the library and the snippets."""

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
    ) -> str:
        directory = Path(directory).resolve()
        run = RunRecord(Path(checkpoint)) if checkpoint else RunRecord(None)
        name = name or (run.dir.name if run.dir else directory.name)
        sections = [
            self._front_matter(kind, run),
            f"# {name}\n\nA GPT-2 language model trained with gpt2lab, exported as {FORMAT_NAMES[kind]}.",
            self._details(model, run, kind, export or {}),
            self._training_data(run),
            self._procedure(run),
            self._evaluation(run),
            self._usage(model, directory, kind),
            LIMITATIONS,
            CITATION,
        ]
        return "\n\n".join(s.strip() for s in sections if s) + "\n"

    def _front_matter(self, kind: str, run: RunRecord) -> str:
        meta = {
            "license": self.license,
            "library_name": {"hf": "transformers", "onnx": "onnx", "torchscript": "pytorch"}[kind],
            "pipeline_tag": "text-generation",
            "tags": ["gpt2lab", "gpt2", "text-generation", *({"hf": [], "onnx": ["onnx"]}.get(kind, ["torchscript"]))],
            "datasets": [run.dataset] if run.dataset else [],
            "metrics": ["perplexity", "bits-per-byte"],
        }
        return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"

    def _details(self, model: GPT2Model, run: RunRecord, kind: str, export: dict[str, Any]) -> str:
        c = model.config
        rows = {
            "architecture": f"GPT-2 decoder: {c.num_layers} layers, width {c.d_model}, {c.num_heads} heads, "
            f"MLP {c.d_ff}, pre-LayerNorm, learned positions, tied input/output embeddings"
            + ("" if c.use_bias else ", no biases"),
            "parameters": f"{model.num_parameters():,}",
            "vocabulary": f"{c.vocab_size:,} tokens",
            "context": f"{c.context_length:,} tokens",
        }
        if run.checkpoint:
            rows["checkpoint"] = f"`{run.checkpoint.name}`" + (f", step {run.step:,}" if run.step is not None else "")
        rows |= {k.replace("_", " "): f"{v:.2g}" if isinstance(v, float) else str(v)
                 for k, v in export.items() if k in DETAIL_KEYS and v is not None}  # fmt: skip
        return "## Model details\n\n" + table(rows) + "\n\n" + FILES[kind]

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
        return "## Training data\n\n" + table(rows)

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

    def _evaluation(self, run: RunRecord) -> str:
        rows = []
        metrics = run.results.get("metrics") or {}
        # The run's metrics are those of one checkpoint: the test split its best (train.py tests the best one), the
        # validation split its last validation (the best one's too when their losses agree). Another checkpoint of
        # the run gets only its own evaluations, not numbers of other weights.
        best_loss = run.results.get("best_val_loss")
        for key, value in metrics.items():
            split, _, metric = key.partition("/")
            if metric not in EVAL_METRICS or not run.measured:
                continue
            if split == "test" or (split == "val" and (best_loss is None or metrics.get("val/loss") == best_loss)):
                rows.append((f"{'validation' if split == 'val' else 'test'} split (training run)", metric, value))
        if run.measured and best_loss is not None and not any(r[0].startswith("validation") for r in rows):
            rows += [
                ("validation split (training run)", m, v)
                for m, v in (("loss", best_loss), ("perplexity", math.exp(best_loss)))
            ]
        for evaluation in run.evaluations:
            for metric in ("loss", "perplexity", "bits_per_byte"):
                if evaluation.get(metric) is not None:
                    rows.append(
                        (f"{evaluation.get('split', '?')} split (gpt2lab.evaluate)", metric, evaluation[metric])
                    )
        note = ""
        if metrics and not run.measured and run.checkpoint:
            note = (
                f"The training run's results are those of its best checkpoint (step {run.best_step}), not of this "
                f"one (step {run.step}): `python -m gpt2lab.evaluate ckpt={run.checkpoint}` measures it, and the "
                "next export lists that here."
            )
        if not rows:
            return "## Evaluation results\n\n" + (note or "No evaluation was recorded for this checkpoint.")
        lines = ["| data | metric | value |", "|---|---|---|"]
        lines += [f"| {data} | {EVAL_METRICS[metric]} | {value:.4f} |" for data, metric, value in rows]
        return "## Evaluation results\n\n" + "\n".join(lines) + (f"\n\n{note}" if note else "")

    def _usage(self, model: GPT2Model, directory: Path, kind: str) -> str:
        c = model.config
        head_dim = c.d_model // c.num_heads
        snippets = {
            "hf": HF_USAGE.format(directory=directory),
            "onnx": ONNX_USAGE.format(directory=directory, layers=c.num_layers, heads=c.num_heads, head_dim=head_dim),
            "torchscript": TORCHSCRIPT_USAGE.format(directory=directory),
        }
        gpt2lab = {
            "hf": "```bash\ngpt2lab train model.init_from={directory}   # fine-tune it in gpt2lab\n```",
            "onnx": '```bash\npython -m gpt2lab.generate onnx={directory} prompt="def"   # onnxruntime: '
            "no PyTorch needed\n```",
            "torchscript": "",
        }[kind].format(directory=directory)
        return "## How to use\n\n" + (f"With gpt2lab:\n\n{gpt2lab}\n\n" if gpt2lab else "") + snippets[kind]


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
        self.evaluations = [e for e in map(read_json, found) if e.get("checkpoint") == str(checkpoint)]

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
        data = self.config.get("data") or {}
        return data.get("name") or data.get("source") or (Path(data["path"]).name if data.get("path") else None)


def step_of(checkpoint: Path, default: int | None) -> int | None:
    """The optimizer step in a checkpoint's name (``step000040-val_loss5.1.ckpt``), else ``default``."""
    match = re.search(r"step(\d+)", checkpoint.name)
    return int(match.group(1)) if match else default


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def table(rows: dict[str, str]) -> str:
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows.items())


FORMAT_NAMES = {
    "hf": "a Hugging Face `transformers` model (`GPT2LMHeadModel`)",
    "onnx": "an ONNX decoder graph with a KV cache, for onnxruntime",
    "torchscript": "a TorchScript program",
}
DETAIL_KEYS = ("opset_version", "optimize", "fp16", "quantize", "method", "max_abs_diff")
FILES = {
    "hf": "Files: `config.json` and `model.safetensors` (transformers' GPT-2), `generation_config.json`, the "
    "tokenizer (`tokenizer.json`, `tokenizer_config.json`).",
    "onnx": "Files: `model.onnx` (inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.<layer>.key` "
    "/ `.value`; outputs `logits`, `present.<layer>.key` / `.value`), `model.safetensors` and `config.json` "
    "(gpt2lab's weights and architecture), the tokenizer (`tokenizer.json`, `tokenizer_config.json`).",
    "torchscript": "Files: `model.pt` (`input_ids` (batch, sequence) in, logits (batch, sequence, vocabulary) out), "
    "`model.safetensors` and `config.json` (gpt2lab's weights and architecture), the tokenizer (`tokenizer.json`, "
    "`tokenizer_config.json`).",
}
HF_USAGE = """With `transformers`:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{directory}")
model = AutoModelForCausalLM.from_pretrained("{directory}")
inputs = tokenizer("def", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
print(tokenizer.decode(output[0]))
```"""
ONNX_USAGE = """With onnxruntime alone (numpy, onnxruntime and tokenizers; greedy decoding with the KV cache):

```python
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

directory = "{directory}"
tokenizer = Tokenizer.from_file(f"{{directory}}/tokenizer.json")
session = ort.InferenceSession(f"{{directory}}/model.onnx", providers=["CPUExecutionProvider"])
ids = np.array([tokenizer.encode("def").ids], dtype=np.int64)
past = {{f"past_key_values.{{i}}.{{kv}}": np.zeros((1, {heads}, 0, {head_dim}), np.float32)
        for i in range({layers}) for kv in ("key", "value")}}
new = ids
for _ in range(20):
    positions = np.arange(ids.shape[1] - new.shape[1], ids.shape[1])[None]
    logits, *presents = session.run(
        None, {{"input_ids": new, "attention_mask": np.ones_like(ids), "position_ids": positions, **past}}
    )
    past = dict(zip(past, presents))  # this step's keys and values are the next step's past
    new = logits[:, -1].argmax(-1)[:, None]
    ids = np.concatenate([ids, new], 1)
print(tokenizer.decode(ids[0].tolist()))
```"""
TORCHSCRIPT_USAGE = """With PyTorch alone (no gpt2lab):

```python
import torch
from tokenizers import Tokenizer

tokenizer = Tokenizer.from_file("{directory}/tokenizer.json")
model = torch.jit.load("{directory}/model.pt")
ids = torch.tensor([tokenizer.encode("def").ids])
with torch.no_grad():
    for _ in range(20):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
print(tokenizer.decode(ids[0].tolist()))
```"""
LIMITATIONS = """## Limitations

A small research model trained with gpt2lab: it continues text in the style of its training data and knows
nothing else. Its output is neither factual nor safe, carries the biases of that data, and should not be shown
to people unreviewed. It reads at most its context of tokens: longer inputs must be cut (gpt2lab's generation
slides the window by itself)."""
CITATION = """## Citation

```bibtex
@article{radford2019language,
  title = {Language Models are Unsupervised Multitask Learners},
  author = {Radford, Alec and Wu, Jeff and Child, Rewon and Luan, David and Amodei, Dario and Sutskever, Ilya},
  year = {2019}
}
```"""
