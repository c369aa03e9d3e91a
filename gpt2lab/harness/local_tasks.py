"""lm-eval tasks on local data: the rows as ``<name>.jsonl`` beside a task YAML that reads them (``dataset_path:
json``), in a directory to give as ``harness.include_path`` (or lm-eval's ``--include_path``). A published task's
data copied here the same way runs without the Hub; the benchmark and the tests build their tasks with it."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

# lm-eval's keys for the three kinds of request, on rows of the fields named in the templates.
ROLLING = {  # the log-likelihood of whole texts, as lm-eval's wikitext: {"text": ...}
    "output_type": "loglikelihood_rolling",
    "doc_to_text": "",
    "doc_to_target": "{{text}}",
    "metric_list": [
        {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
    ],
}
MULTIPLE_CHOICE = {  # HellaSwag's form: {"ctx": ..., "endings": [four], "label": index of the right one}
    "output_type": "multiple_choice",
    "doc_to_text": "{{ctx}}",
    "doc_to_target": "{{label}}",
    "doc_to_choice": "{{endings}}",
    "metric_list": [
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    ],
}


def generation(until: list[str], max_gen_toks: int) -> dict[str, Any]:
    """Greedy continuations of ``{"prompt": ...}`` scored by exact match with ``{"answer": ...}``."""
    return {
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }


def write_task(directory: str | Path, name: str, rows: Iterable[Mapping[str, Any]], kind: Mapping[str, Any]) -> Path:
    """Write task ``name`` of ``kind`` (ROLLING, MULTIPLE_CHOICE, generation(...)) on ``rows`` into ``directory``;
    returns the YAML file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(dict(row)) + "\n" for row in rows))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        **kind,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
