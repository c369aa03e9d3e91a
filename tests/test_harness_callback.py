"""``callbacks.harness``: lm-eval tasks scored while a model trains (HellaSwag in ``preset=small``), logged as
``harness/<task>/<metric>``; a run whose tasks cannot be had goes on after one warning."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from conftest import TINY, train_in_process

from gpt2lab.errors import ConfigError
from gpt2lab.harness.local_tasks import MULTIPLE_CHOICE, write_task

pytest.importorskip("lm_eval")

WORDS = [
    "the",
    "model",
    "reads",
    "a",
    "file",
    "of",
    "text",
    "and",
    "learns",
    "which",
    "word",
    "comes",
    "next",
    "in",
    "each",
    "line",
    "it",
    "sees",
]


def write_choice_task(directory: Path, rows: int = 12) -> str:
    """A multiple-choice task in HellaSwag's form (a context, four endings, acc and acc_norm), on local jsonl."""
    docs = []
    for i in range(rows):
        words = [WORDS[(i * 3 + j) % len(WORDS)] for j in range(10)]
        endings = [" " + " ".join(words[7:9]), " " + " ".join(words[1:3]), " a b", " next line"]
        docs.append({"ctx": " ".join(words[:7]), "endings": endings, "label": 0})
    write_task(directory, "demo_choice", docs, MULTIPLE_CHOICE)
    return "demo_choice"


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_tasks_are_scored_at_validations_and_training_goes_on_as_without_them(tmp_path, corpus_file, cache_dir):
    task = write_choice_task(tmp_path / "tasks")
    base = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "sample=null", "test=false"]
    base.append("model.dropout=0.1")  # training draws from torch's RNG at every step
    harness = [
        f"callbacks.harness.tasks=[{task}]",
        f"callbacks.harness.include_path={tmp_path / 'tasks'}",
        "callbacks.harness.limit=8",
    ]
    scored = train_in_process(tmp_path / "scored", [*base, *harness])
    plain = train_in_process(tmp_path / "plain", base)

    logged = [r for r in rows(scored) if r.get("harness/demo_choice/acc")]
    assert [int(r["step"]) for r in logged] == [4, 8]  # every validation of the fit (val_check_interval=4)
    assert all(0 <= float(r[f"harness/demo_choice/{m}"]) <= 1 for r in logged for m in ("acc", "acc_norm"))
    assert "harness/demo_choice/acc" not in rows(plain)[0]
    # lm-eval seeds python, numpy and torch: the callback gives the training its RNG states back (dropout draws),
    # so every training loss is what the run without it logged.
    losses = [[r["train/loss"] for r in rows(run) if r["train/loss"]] for run in (scored, plain)]
    assert losses[0] == losses[1] and len(losses[0]) >= 4

    # The last figures are those of the final model, scored by `gpt2lab evaluate tasks=...` (the same lm-eval run).
    from gpt2lab.harness.lm import GPT2LabLM
    from gpt2lab.harness.tasks import flat_metrics, load_tasks, run_tasks

    lm = GPT2LabLM(str(scored / "checkpoints" / "last.ckpt"), device="cpu")
    final = flat_metrics(run_tasks(lm, load_tasks([task], str(tmp_path / "tasks")), limit=8))
    assert float(logged[-1]["harness/demo_choice/acc_norm"]) == pytest.approx(final["demo_choice/acc_norm"])


def test_a_task_that_cannot_be_had_is_one_warning_and_the_run_goes_on(
    tmp_path, corpus_file, cache_dir, monkeypatch, caplog
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub.yaml").write_text(  # HellaSwag's data source, which this offline machine does not have
        "task: hub_choice\ndataset_path: Rowan/hellaswag\ntest_split: validation\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{endings}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    overrides = [*TINY, f"data.path={corpus_file}", f"paths.cache_dir={cache_dir}", "sample=null", "test=false"]
    overrides += ["callbacks.harness.tasks=[hub_choice]", f"callbacks.harness.include_path={tasks}"]
    with caplog.at_level(logging.WARNING, logger="gpt2lab.harness"):
        run = train_in_process(tmp_path / "run", overrides)
    warnings = [r.getMessage() for r in caplog.records if r.name == "gpt2lab.harness"]
    assert len(warnings) == 1
    assert "task hub_choice" in warnings[0] and "Rowan/hellaswag" in warnings[0]
    assert "harness.include_path" in warnings[0] and "Training goes on" in warnings[0]
    assert json.loads((run / "results.json").read_text())["global_step"] == 8
    assert not any(key.startswith("harness/") for key in rows(run)[0])


@pytest.mark.parametrize(
    ("key", "value"), [("every_n_validations", 0), ("limit", 0), ("num_fewshot", -1), ("batch_size", 0)]
)
def test_bad_settings_fail_as_the_run_starts(key, value):
    from gpt2lab.harness.callback import Harness

    with pytest.raises(ConfigError, match=rf"callbacks\.harness\.{key}={value}: expected"):
        Harness(tasks=["hellaswag"], **{key: value})


def test_preset_small_tracks_hellaswag_and_the_default_run_tracks_nothing(compose_cfg):
    assert list(compose_cfg("preset=small", tiny=False).callbacks.harness.tasks) == ["hellaswag"]
    assert list(compose_cfg().callbacks.harness.tasks) == []
