"""The check-up's reports: a pass/warn/fail table per tier for the terminal, ``check.md`` and ``check.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from gpt2lab.checkup.subject import FAIL, CheckResult, fmt
from gpt2lab.console import table

TIER_NAMES = {1: "critical", 2: "analysis", 3: "training"}
SUMMARY_WIDTH = 90


def format_table(results: list[CheckResult]) -> str:
    """One table per tier: check, status, seconds, summary (wrapped)."""
    tables = []
    for tier in sorted({r.tier for r in results}):
        rows = [(r.name, r.status.upper(), f"{r.seconds:.1f} s", r.summary) for r in results if r.tier == tier]
        aligns = ["left", "left", "right", "left"]
        grid = table(["check", "status", "time", "summary"], rows, align=aligns, wrap={"summary": SUMMARY_WIDTH})
        tables.append(f"Tier {tier}: {TIER_NAMES.get(tier, '')}\n{grid}")
    return "\n\n".join(tables)


def failed(results: list[CheckResult]) -> list[str]:
    return [r.name for r in results if r.status == FAIL]


def write_reports(
    results: list[CheckResult], output_dir: str | Path, about: dict[str, Any] | None = None
) -> list[Path]:
    """``check.md`` (the tables, then the details worth reading: initialisation statistics, memory, figures)
    and ``check.json`` (everything, for programs) in ``output_dir``; ``about`` describes the model."""
    output_dir, about = Path(output_dir), about or {}
    output_dir.mkdir(parents=True, exist_ok=True)
    data = {"about": about, "results": [dataclasses.asdict(r) for r in results], "failed": failed(results)}
    json_path = output_dir / "check.json"
    json_path.write_text(json.dumps(data, indent=2, default=str, allow_nan=True))
    md_path = output_dir / "check.md"
    md_path.write_text(markdown(results, about))
    return [md_path, json_path]


def markdown(results: list[CheckResult], about: dict[str, Any]) -> str:
    lines = ["# Model check-up", ""]
    lines += [f"- {key}: {value}" for key, value in about.items()]
    for tier in sorted({r.tier for r in results}):
        rows = [(r.name, r.status, f"{r.seconds:.1f} s", r.summary) for r in results if r.tier == tier]
        grid = table(["check", "status", "time", "summary"], rows, markdown=True)
        lines += ["", f"## Tier {tier}: {TIER_NAMES.get(tier, '')}", "", grid]
    for r in results:
        section = details_markdown(r)
        if section or r.files:
            lines += ["", f"### {r.name}", "", *section]
            lines += [f"![{name}]({name})" for name in r.files]
    return "\n".join(lines) + "\n"


def details_markdown(r: CheckResult) -> list[str]:
    """Tables for the details that read as tables; other details stay in check.json."""
    if "per_layer_type" in r.details:
        columns = ["parameters", "count", "mean", "std", "min", "max", "expected std"]
        rows = [
            (kind, f"{row['count']:,}", *(fmt(row[k]) for k in ("mean", "std", "min", "max")),
             fmt(row["expected_std"]) if "expected_std" in row else "")
            for kind, row in r.details["per_layer_type"].items()
        ]  # fmt: skip
        return table(columns, rows, markdown=True).splitlines()
    if "adamw_state" in r.details:
        keys = ("parameters", "gradients", "adamw_state", "activations", "total")
        mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
        return table(
            ["", "MiB"], [(k, mib(r.details[k])) for k in keys], markdown=True, align=["left", "right"]
        ).splitlines()
    if "normalised_entropy" in r.details:
        entropy = r.details["normalised_entropy"]
        heads = len(entropy[0])
        columns = ["layer", *(f"head {h}" for h in range(heads))]
        rows = table(columns, [(i, *(f"{e:.2f}" for e in row)) for i, row in enumerate(entropy)], markdown=True)
        return ["Normalised attention entropy (1: uniform over the visible tokens, 0: one token):", "", rows, ""]
    if "grad_norms" in r.details and r.details["grad_norms"]:
        norms = r.details["grad_norms"]
        finite = [v for v in norms.values() if math.isfinite(v)]
        return [f"Gradient norms range from {fmt(min(finite))} to {fmt(max(finite))} over {len(norms)} parameters."]
    return []
