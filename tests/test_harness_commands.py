"""``gpt2lab evaluate tasks=[...]`` and ``gpt2lab lm-eval``: lm-evaluation-harness tasks on a checkpoint, as users
run them. The tasks are local YAML files with jsonl data written here (``harness.include_path`` / ``--include_path``),
so nothing is fetched; the texts are short, for the tiny model's 32-token context.

Agreement of ``--model gpt2lab`` with ``--model hf`` on the export is tests/test_harness_agreement.py.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab.harness.local_tasks import MULTIPLE_CHOICE, ROLLING, write_task

CHOICE_DOCS = [  # HellaSwag's form: a context and four endings, one of them right
    ("The cat sat on the", [" mat", " def", " import", " return"], 0),
    ("def add(a, b): return a", [" if", " + b", " class", " ("], 1),
    ("import os and import", [" the", " for", " sys", " )"], 2),
    ("for i in range(10):", [" cat", " dog", " mat", " print"], 3),
    ("class Point(object):", [" pass", " the", " of", " and"], 0),
    ("if x is None: return", [" sat", " None", " cat", " mat"], 1),
]
ROLLING_TEXTS = [  # a few are longer than the context: lm-eval's rolling windows
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "    def __repr__(self):\n        return f'Point({self.x}, {self.y})'\n",
    "for i in range(10):\n    if i % 2:\n        print(i)\n",
    "The module is imported once; later imports find it in sys.modules and return it.",
]
HUB_YAML = """task: demo_hub
dataset_path: Rowan/hellaswag
test_split: validation
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{endings}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of task YAML files (``--include_path``): a multiple-choice task and a rolling one on local
    jsonl data, and one whose data is on the Hugging Face Hub."""
    root = tmp_path_factory.mktemp("tasks")
    choice = [{"ctx": ctx, "endings": endings, "label": label} for ctx, endings, label in CHOICE_DOCS]
    write_task(root, "demo_choice", choice, MULTIPLE_CHOICE)
    write_task(root, "demo_rolling", ({"text": text} for text in ROLLING_TEXTS), ROLLING)
    (root / "hub.yaml").write_text(HUB_YAML.format())
    return root


@pytest.fixture
def evaluate_cli(run_main, cache_dir, task_dir):
    """``gpt2lab evaluate ARGS harness.include_path=<task_dir>``, in this process."""

    def _evaluate(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return run_main(
            "gpt2lab.evaluate", f"paths.cache_dir={cache_dir}", f"harness.include_path={task_dir}", *args, cwd=cwd,
            env=env,
        )  # fmt: skip

    return _evaluate


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The command's one ``Error:`` line, after asserting that it failed as bad input fails: status 1, no
    traceback, exactly one such line."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def table_rows(stdout: str) -> dict[tuple[str, str], float]:
    """lm-eval's markdown table: ``{(task, metric): value}`` (a task's name is on its first row only)."""
    rows, task = {}, ""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and line.startswith("|") and not set(cells[4]) <= {"-", ":"}:
            task = cells[0] or task
            if cells[4] != "Metric":
                rows[(task, cells[4])] = float(cells[6])
    return rows


def test_evaluate_prints_lm_evals_table_and_keeps_its_results(evaluate_cli, trained_run, tmp_path):
    result = evaluate_cli(
        f"ckpt={trained_run}", "tasks=[demo_choice,demo_rolling]", "limit=4", "hydra.run.dir=ev", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^\|\s*Tasks\s*\|Version\|Filter\|n-shot\|\s*Metric\s*\|", result.stdout, re.MULTILINE)
    shown = table_rows(result.stdout)
    assert {("demo_choice", "acc"), ("demo_choice", "acc_norm"), ("demo_rolling", "bits_per_byte")} <= set(shown)
    kept = json.loads((tmp_path / "ev" / "eval.json").read_text())
    metrics = kept["metrics"]
    assert {"demo_choice/acc", "demo_choice/acc_norm", "demo_choice/acc_stderr", "demo_rolling/bits_per_byte",
            "demo_rolling/word_perplexity", "demo_rolling/byte_perplexity"} <= set(metrics)  # fmt: skip
    assert all(key.count("/") == 1 and "," not in key for key in metrics)  # lm-eval's ",none" filter suffix is gone
    for (task, metric), value in shown.items():  # the table shows the numbers kept
        assert value == pytest.approx(metrics[f"{task}/{metric}"], abs=1e-4), (task, metric)
    assert 0 <= metrics["demo_choice/acc"] <= 1 and 0 < metrics["demo_rolling/bits_per_byte"] < 20
    # lm-eval's own results beside them, and the limit honoured: 4 of each task's documents.
    assert kept["results"]["demo_choice"]["acc,none"] == metrics["demo_choice/acc"]
    assert kept["n-samples"]["demo_choice"] == {"original": len(CHOICE_DOCS), "effective": 4}
    assert kept["n-samples"]["demo_rolling"] == {"original": len(ROLLING_TEXTS), "effective": 4}
    assert kept["tasks"] == ["demo_choice", "demo_rolling"] and kept["limit"] == 4
    assert kept["checkpoint"].startswith(str(trained_run)) and kept["lm_eval_version"]


def test_one_task_name_and_a_csv_logger_at_the_checkpoints_step(evaluate_cli, trained_run, tmp_path):
    from gpt2lab.checkpoint import find_checkpoint, read_checkpoint

    result = evaluate_cli(
        f"ckpt={trained_run}", "tasks=demo_choice", "limit=3", "logger=csv", "hydra.run.dir=ev", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kept = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert kept["tasks"] == ["demo_choice"] and kept["n-samples"]["demo_choice"]["effective"] == 3
    (row,) = csv.DictReader((tmp_path / "ev" / "metrics.csv").open())
    step = read_checkpoint(find_checkpoint(str(trained_run), str(tmp_path))).get("global_step", 0)
    assert step > 0 and int(row["step"]) == step
    logged = {key.removeprefix("harness/"): float(value) for key, value in row.items() if key.startswith("harness/")}
    assert logged == pytest.approx(kept["metrics"]) and {"demo_choice/acc", "demo_choice/acc_norm"} <= set(logged)


def test_a_multirun_returns_the_chosen_task_metric_to_the_sweep(evaluate_cli, trained_run, tmp_path):
    result = evaluate_cli(
        "-m", f"ckpt={trained_run}", "tasks=[demo_choice]", "limit=2,4", "optimized_metric=demo_choice/acc",
        "hydra.sweep.dir=sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for job, limit in (("0", 2), ("1", 4)):
        kept = json.loads((tmp_path / "sweep" / job / "eval.json").read_text())
        assert kept["n-samples"]["demo_choice"]["effective"] == limit
        summary = json.loads((tmp_path / "sweep" / job / "job_summary.json").read_text())
        assert summary["status"] == "finished" and summary["objective"] == kept["metrics"]["demo_choice/acc"]
    assert (tmp_path / "sweep" / "summary.csv").is_file()
    # An objective the tasks do not measure fails the job, naming what they do measure; eval.json is kept.
    wrong = evaluate_cli(
        "-m", f"ckpt={trained_run}", "tasks=[demo_choice]", "limit=2", "optimized_metric=demo_choice/bits_per_byte",
        "hydra.sweep.dir=wrong", cwd=tmp_path,
    )  # fmt: skip
    line = one_error_line(wrong)  # the multirun ends with status 1, its one job failed
    assert line == (
        "Error: optimized_metric=demo_choice/bits_per_byte: not among the results of tasks=[demo_choice]; "
        "choose one of demo_choice/acc, demo_choice/acc_norm"
    )
    assert "demo_choice" in json.loads((tmp_path / "wrong" / "0" / "eval.json").read_text())["results"]
    summary = json.loads((tmp_path / "wrong" / "0" / "job_summary.json").read_text())
    assert summary["status"] == "failed" and summary["objective"] is None
    assert summary["error"] == f"ConfigError: {line.removeprefix('Error: ')}"


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["tasks=[demo_choise]"], r"no task 'demo_choise' \(did you mean demo_choice[ )].*harness\.include_path="),
        (["tasks=[demo_hub]"], r"task demo_hub: its data .*'Rowan/hellaswag'.*not in the local cache.*Hub is "
                               r"switched off.*load_dataset\('Rowan/hellaswag'\).*harness\.include_path=<dir>"),
        (["tasks=[demo_choice]", "harness.include_path=no_such_dir"], r"harness\.include_path=no_such_dir: not a dir"),
        (["tasks=[demo_choice]", "limit=0"], r"limit=0(\.0)?: expected a positive number"),
        (["tasks=[demo_choice]", "num_fewshot=-1"], r"num_fewshot=-1: expected 0 or more"),
        (["tasks=[demo_choice]", "harness.dtype=fp8"], r"harness\.dtype=fp8: expected one of float32, bfloat16"),
        (["tasks=[demo_choice]", "harness.batch_size=0"], r"harness\.batch_size=0: expected at least 1"),
        (["tasks=[]"], r"tasks=\[\]: expected lm-eval task names"),
    ],
    ids=[
        "unknown task", "data not to be had", "missing include_path", "limit 0", "negative num_fewshot", "dtype",
        "batch size", "no task",
    ],
)  # fmt: skip
def test_bad_task_input_is_one_error_line(evaluate_cli, trained_run, tmp_path, monkeypatch, args, expected):
    # As a process started with HF_HUB_OFFLINE=1 (datasets and huggingface_hub read it when imported).
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    line = one_error_line(evaluate_cli(f"ckpt={trained_run}", *args, cwd=tmp_path, env=OFFLINE))
    assert re.search(expected, line), line
    assert not list(tmp_path.rglob("eval.json"))


def test_without_lm_eval_installed_both_commands_say_what_to_install(
    evaluate_cli, run_main, trained_run, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    evaluate = one_error_line(evaluate_cli(f"ckpt={trained_run}", "tasks=[demo_choice]", cwd=tmp_path))
    harness = one_error_line(run_main("gpt2lab.cli", "lm-eval", "--tasks", "demo_choice", cwd=tmp_path))
    for line in (evaluate, harness):
        assert "lm-evaluation-harness, which is not installed" in line and "pip install 'gpt2lab[eval]'" in line


def test_lm_eval_command_runs_the_gpt2lab_model(run_main, trained_run, task_dir, tmp_path, monkeypatch):
    def lm_eval(*model_args: str, device: str = "cpu") -> subprocess.CompletedProcess:
        return run_main(
            "gpt2lab.cli", "lm-eval", "--model", "gpt2lab", "--model_args", ",".join(model_args),
            "--tasks", "demo_choice", "--include_path", str(task_dir), "--limit", "4", "--device", device, cwd=tmp_path,
        )  # fmt: skip

    result = lm_eval(f"ckpt={trained_run}", "batch_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    shown = table_rows(result.stdout)
    assert {("demo_choice", "acc"), ("demo_choice", "acc_norm")} <= set(shown)
    assert f"gpt2lab ({{'ckpt': '{trained_run}', 'batch_size': 4}})" in result.stdout  # lm-eval's line above the table
    # The calls below find their task in --include_path without lm-eval's index of its own ~15,000 (10 s apiece).
    from lm_eval.tasks import TaskManager

    index = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, **kw: index(self, **kw, include_defaults=False))
    # --model_args win over lm-eval's --device: cuda:7 is no device here, the model runs on the CPU as told.
    result = lm_eval(f"ckpt={trained_run}", "device=cpu", device="cuda:7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert table_rows(result.stdout) == shown  # the same model, examples and scores
    if not torch.cuda.is_available():  # lm-eval's own default --device, cuda:0, on a machine without one: auto
        result = lm_eval(f"ckpt={trained_run}", device="cuda:0")
        assert result.returncode == 0, result.stderr[-3000:]
        assert table_rows(result.stdout) == shown
    line = one_error_line(lm_eval(f"ckpt={trained_run}", "foo=1"))
    assert "--model_args foo: not an argument of the gpt2lab model" in line and "ckpt=" in line
    line = one_error_line(lm_eval(f"ckpt={tmp_path / 'no_such_run'}"))
    assert "no_such_run" in line


def test_lm_eval_command_without_arguments_prints_lm_evals_help(run_main, tmp_path):
    result = run_main("gpt2lab.cli", "lm-eval", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: lm-eval ") and "\n    run " in result.stdout  # its subcommands
