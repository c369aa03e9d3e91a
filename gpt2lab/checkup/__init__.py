"""The model check-up: tiers of checks on a model built from config or loaded from a checkpoint.

gpt2lab's GPT-2 gets every check; a ``CausalLM`` (``model=hf``, ``model=module``) every check that needs only
its logits and its token embedding: the attention heatmaps (read from GPT-2's attention layers) are skipped and
its initialisation is reported without a reference.

Tier 1 (``critical.py``) must pass before training; tier 2 (``analysis.py``) shows where the model looks
and what its prediction depends on; tier 3 (``training.py``) trains copies of it briefly. ``run_all_tests``
runs tiers 1..N and returns one ``CheckResult`` per check; a check that raises is a failure that carries
the exception, so a broken model gets a full report rather than a traceback. ``python -m gpt2lab.check``
is the command line (docs/checkup.md).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

from tokenizers import Tokenizer

from gpt2lab.checkup import analysis, critical, training
from gpt2lab.checkup.report import failed, format_table, write_reports
from gpt2lab.checkup.subject import FAIL, PASS, SKIP, WARN, CheckConfig, CheckResult, Subject
from gpt2lab.model import GPT2Model
from gpt2lab.model.adapter import CausalLM

TIERS: dict[int, list[Callable[[Subject], CheckResult]]] = {
    1: critical.CHECKS,
    2: analysis.CHECKS,
    3: training.CHECKS,
}

__all__ = [
    "FAIL", "PASS", "SKIP", "TIERS", "WARN", "CheckConfig", "CheckResult", "failed", "format_table",
    "run_all_tests", "run_all_tier1_tests", "run_all_tier2_tests", "run_all_tier3_tests", "write_reports",
]  # fmt: skip


def run_tier(
    tier: int,
    model: GPT2Model | CausalLM,
    config: CheckConfig | Mapping | None = None,
    trained: bool = False,
    tokenizer: Tokenizer | None = None,
    output_dir: str | Path | None = None,
) -> list[CheckResult]:
    """The checks of one tier. ``trained``: the weights are not at initialisation (a checkpoint), so the
    expectations of a fresh model are skipped; ``output_dir``: where figures go (none if None)."""
    if not isinstance(config, CheckConfig):  # None, or the settings as a dict (``conf/check.yaml``'s ``check``)
        config = CheckConfig(**(config or {}))
    subject = Subject(model, config, trained, tokenizer, Path(output_dir) if output_dir else None)
    results = []
    for check in TIERS[tier]:
        started = time.perf_counter()
        try:
            result = check(subject)
        except Exception as e:
            name = check.__name__.replace("_", " ")
            result = CheckResult(
                name, tier, FAIL, f"raised {type(e).__name__}: {e}", {"traceback": traceback.format_exc()}
            )
        result.seconds = time.perf_counter() - started
        results.append(result)
    return results


def run_all_tier1_tests(
    model: GPT2Model | CausalLM, config: CheckConfig | Mapping | None = None, **options
) -> list[CheckResult]:
    """Tier 1: shapes, gradient flow, output stability, loss at init, causality, initialisation, memory,
    tokens/s. ``options``: ``trained``, ``tokenizer``, ``output_dir`` (see ``run_tier``)."""
    return run_tier(1, model, config, **options)


def run_all_tier2_tests(
    model: GPT2Model | CausalLM, config: CheckConfig | Mapping | None = None, **options
) -> list[CheckResult]:
    """Tier 2: attention patterns, feature attribution, perturbation sensitivity."""
    return run_tier(2, model, config, **options)


def run_all_tier3_tests(
    model: GPT2Model | CausalLM, config: CheckConfig | Mapping | None = None, **options
) -> list[CheckResult]:
    """Tier 3: fine-tuning on a fixed batch, a 4-trial learning-rate search."""
    return run_tier(3, model, config, **options)


def run_all_tests(
    model: GPT2Model | CausalLM, config: CheckConfig | Mapping | None = None, tier: int = 3, **options
) -> list[CheckResult]:
    """Tiers 1 to ``tier``, in order."""
    return [result for t in range(1, tier + 1) for result in run_tier(t, model, config, **options)]
