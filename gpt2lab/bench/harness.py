"""``python -m gpt2lab.bench harness --ckpt <run>``: lm-eval with ``--model gpt2lab`` beside ``--model hf`` on the
checkpoint's Hugging Face export, on the same tasks in the same process: a rolling log-likelihood task and a
multiple-choice task in HellaSwag's form, built from Python's standard library (text the default run's model
reads). Each row is lm-eval's whole evaluation with the model already loaded, timed ``--repeats`` times in turn
(median), with both models' figures, which must agree. It measures only while other processes leave the cores
free (``bench.machine``: ``--busy-ok``, ``--busy-wait``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gpt2lab.bench import machine
from gpt2lab.console import table
from gpt2lab.data.pystdlib import pystdlib_documents
from gpt2lab.errors import ConfigError
from gpt2lab.exporters.huggingface import HFExporter
from gpt2lab.harness.lm import GPT2LabLM
from gpt2lab.harness.local_tasks import MULTIPLE_CHOICE, ROLLING, write_task
from gpt2lab.harness.tasks import flat_metrics, load_tasks, run_tasks
from gpt2lab.lit.speed import describe_load

METRICS = {"bench_rolling": "bits_per_byte", "bench_choice": "acc_norm"}


def write_tasks(directory: Path, documents: int, examples: int) -> None:
    """``documents`` stdlib files (their first 4,000 characters) to score whole, and ``examples`` four-way
    choices: five lines of a file, then its next line against three lines drawn from elsewhere."""
    _, texts = pystdlib_documents()
    texts = [t for t in texts if len(t) > 4000]
    rng = random.Random(0)
    write_task(directory, "bench_rolling", ({"text": t[:4000]} for t in texts[:documents]), ROLLING)
    lines = [[line for line in t.splitlines() if 10 < len(line.strip()) < 80] for t in texts[documents:]]
    lines = [ls for ls in lines if len(ls) > 6]
    every = [line for ls in lines for line in ls]
    rows = []
    for i in range(examples):
        file_lines = lines[i % len(lines)]
        start = rng.randrange(len(file_lines) - 6)
        right = "\n" + file_lines[start + 5]
        endings = [right, *("\n" + rng.choice(every) for _ in range(3))]
        rng.shuffle(endings)
        rows.append(
            {"ctx": "\n".join(file_lines[start : start + 5]), "endings": endings, "label": endings.index(right)}
        )
    write_task(directory, "bench_choice", rows, MULTIPLE_CHOICE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.bench harness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a .ckpt file or a run directory (the default run's, say)")
    parser.add_argument("--documents", type=int, default=48, help="texts of the rolling task")
    parser.add_argument("--examples", type=int, default=200, help="examples of the multiple-choice task")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward pass, for both")
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations per row (median)")
    machine.add_busy_options(parser)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        at_start = machine.wait_for_free_cores(args.busy_ok, args.busy_wait, gpu=device == "cuda")
        ours = GPT2LabLM(args.ckpt, device=device, batch_size=args.batch_size)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as tmp:
        HFExporter().export(ours.model, Path(tmp) / "hf", ours.tokenizer_)
        theirs = HFLM(pretrained=str(Path(tmp) / "hf"), device=device, batch_size=args.batch_size, dtype="float32")
        write_tasks(Path(tmp) / "tasks", args.documents, args.examples)
        seconds, values = measure({"gpt2lab": ours, "hf": theirs}, Path(tmp) / "tasks", args.repeats)
    at_end = machine.busy_share()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"{args.ckpt}: {ours.model.num_parameters() / 1e6:.1f}M parameters, context {ours.max_length}, float32, "
        f"batch {args.batch_size}; {name}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = []
    for task, metric in METRICS.items():
        a, b = (statistics.median(seconds[model][task]) for model in ("gpt2lab", "hf"))
        shown = [f"{values[model][f'{task}/{metric}']:.6f}" for model in ("gpt2lab", "hf")]
        rows.append([f"{task} ({metric})", f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}x", *shown])
    columns = ["task", "gpt2lab s", "hf s", "hf / gpt2lab", "gpt2lab figure", "hf figure"]
    print(table(columns, rows, markdown=True, align=["left"] + ["right"] * 5))
    print(describe_load(at_start, at_end))
    return 0


def measure(lms: dict[str, Any], include_path: Path, repeats: int) -> tuple[dict, dict]:
    """Seconds of each lm-eval evaluation per model and task, the models in turn; and each model's figures."""
    seconds: dict[str, dict[str, list[float]]] = {model: {task: [] for task in METRICS} for model in lms}
    values: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for model, lm in lms.items():
            for task in METRICS:
                tasks = load_tasks([task], str(include_path))
                started = time.perf_counter()
                values.setdefault(model, {}).update(flat_metrics(run_tasks(lm, tasks)))
                seconds[model][task].append(time.perf_counter() - started)
    return seconds, values


if __name__ == "__main__":
    raise SystemExit(main())
