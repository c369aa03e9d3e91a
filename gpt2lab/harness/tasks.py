"""lm-evaluation-harness tasks for ``gpt2lab evaluate tasks=[...]`` and the training callback: find and load them
(their data fetched or read from the local cache), run them through ``GPT2LabLM``, and read the results.

A task that cannot be had stops before any model is run, with one ``Error:`` line that names it and says where its
data comes from; the callback turns that line into a warning instead, so that a run offline goes on.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from typing import Any

from gpt2lab.errors import ConfigError
from gpt2lab.hub import go_offline_if_unreachable

log = logging.getLogger("gpt2lab.harness")
INSTALL = "pip install 'gpt2lab[eval]' (in a clone: pip install -e '.[eval]')"


def require_lm_eval() -> None:
    """One ``Error:`` line, not an ImportError, when the optional extra is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(f"tasks need lm-evaluation-harness, which is not installed: {INSTALL}") from None


def load_tasks(names: str | Sequence[str], include_path: str | None = None) -> list[Any]:
    """lm-eval's task (or group) objects for ``names``, their data loaded. ``include_path`` is a directory of task
    YAML files of your own; lm-eval's ~15,000 built-in tasks are indexed only when a name is not found there."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    names = [names] if isinstance(names, str) else list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"tasks={names!r}: expected lm-eval task names, e.g. tasks=[hellaswag,lambada_openai]")
    if include_path is not None and not os.path.isdir(include_path):
        raise ConfigError(f"harness.include_path={include_path}: not a directory (of lm-eval task YAML files)")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines: what it builds and runs, step by step
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not all(name in manager.all_tasks for name in names):
        manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        raise ConfigError(
            f"tasks: lm-eval has no task {unknown[0]!r}"
            + (f" (did you mean {' or '.join(close)}?)" if close else "")
            + ". `lm_eval ls tasks` lists them; a task of your own is a YAML file in a directory given as "
            "harness.include_path=<dir>"
        )
    offline = go_offline_if_unreachable()
    loaded = []
    for name in names:
        try:
            found = manager.load(name)
        except (ConnectionError, FileNotFoundError, TimeoutError) as e:  # datasets: no network, no cached copy
            raise ConfigError(_data_error(name, manager, e, offline)) from e
        except Exception as e:  # lm-eval could not build it: a task YAML that does not fit its data
            entry = getattr(manager, "_index", {}).get(name)
            raise ConfigError(
                f"task {name}: lm-eval could not build it from {getattr(entry, 'yaml_path', None) or 'its config'} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no message'}); check the task "
                "YAML's splits and fields against its data"
            ) from e
        loaded += [found["groups"][name]] if name in found["groups"] else list(found["tasks"].values())
    return loaded


def _data_error(name: str, manager: Any, error: Exception, offline: str | None) -> str:
    """The ``Error:`` line of a task whose data cannot be had: which data, why, and the two ways out."""
    entry = getattr(manager, "_index", {}).get(name)  # lm-eval's index of task YAML files: where the data comes from
    config = getattr(entry, "cfg", None) or {}
    source = ", ".join(repr(a) for a in (config.get("dataset_path"), config.get("dataset_name")) if a)
    why = offline or f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return (
        f"task {name}: its data (datasets.load_dataset({source or '...'})) is not in the local cache and could not "
        f"be fetched ({why}). Fetch it once where the Hugging Face Hub is reachable "
        f'(python -c "import datasets; datasets.load_dataset({source})") and copy $HF_HOME/datasets here, or point '
        "the task at a local copy: a task YAML with dataset_path: json and dataset_kwargs: {data_files: ...} in a "
        "directory given as harness.include_path=<dir>"
    )


def run_tasks(
    lm: Any, tasks: list[Any], limit: int | float | None = None, num_fewshot: int | None = None
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``lm`` on loaded ``tasks``: its whole results dictionary."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    check_settings(limit, num_fewshot)
    # No verbosity: lm-eval would then give its logger a console handler of its own and cut it off from the run's
    # log files; its warnings go through the root logger's handlers as gpt2lab's do.
    return simple_evaluate(
        model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000,
        task_manager=TaskManager(include_defaults=False),  # the tasks are loaded: no index of lm-eval's own
    )  # fmt: skip


def check_settings(limit: int | float | None, num_fewshot: int | None) -> None:
    """``limit`` and ``num_fewshot`` in range, before any task or model is loaded."""
    if limit is not None and not limit > 0:
        raise ConfigError(f"limit={limit:g}: expected a positive number of examples per task (or a share below 1)")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"num_fewshot={num_fewshot}: expected 0 or more examples in each prompt")


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` of every task and group, without lm-eval's filter suffix (``acc,none``)."""
    flat = {}
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            for key, value in metrics.items():
                metric, _, kept_by = key.partition(",")
                if isinstance(value, int | float) and not isinstance(value, bool) and kept_by:
                    name = metric if kept_by == "none" else f"{metric}_{kept_by}"
                    flat[f"{task}/{name}"] = float(value)
    return flat


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own table of the results (and of the groups, if any)."""
    from lm_eval.utils import make_table

    return make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")
