"""The recipes in ``conf/preset/``: their names, what their headers say, what each one costs, how long it would train
on this machine (from the throughput probe, ``probe``), a copy to edit, and the one that fits a goal and a budget.

    gpt2lab presets ls                                   # name, description, parameters, tokens, time here
    gpt2lab presets cp small my_recipe                   # conf/experiment/my_recipe.yaml, to edit
    gpt2lab presets --recommend goal=learning time_budget_hours=5
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from gpt2lab.config import compose_train
from gpt2lab.config.experiments import write_experiment
from gpt2lab.config.schemas import OPTIMIZER_OPTIONS, SCHEDULE_OPTIONS
from gpt2lab.config.tree import config_root
from gpt2lab.console import format_duration, table
from gpt2lab.errors import ConfigError
from gpt2lab.model import GPT2Model
from gpt2lab.presets.needs import needs_first, unmet_needs
from gpt2lab.presets.probe import (
    cache_file,
    device_name,
    is_cached,
    measure_throughput,
    model_config,
    probe_device,
    run_seconds,
)

HEADER_NUMBERS = re.compile(
    r"#\s*parameters:\s*([\d,]+)\s*\|\s*tokens/step:\s*([\d,]+).*\|\s*total:\s*([\d,]+) tokens \(([\d,]+) steps\)"
)
SIZE_ORDER = ("tiny", "small", "medium", "large", "code_generation", "chat", "summarization")
COLUMNS = ("preset", "description", "parameters", "tokens (per step)", "optimizer, schedule", "est. time here", "probe")
ALIGN = ("left", "left", "right", "right", "left", "right", "left")

# --recommend goal=...: the presets each goal considers, most ambitious first, and the share of a preset's
# estimated time a budget must cover for it to be picked with its schedule shortened (trainer.time_budget).
GOALS: dict[str, tuple[tuple[str, ...], float, str]] = {
    "learning": (("small", "tiny"), 0.1, "see a GPT-2 learn: GPT-2 124M when a tenth of its recipe fits, else tiny"),
    "quality": (
        ("large", "medium", "small", "tiny"),
        0.5,
        "the lowest loss: the largest model that trains on at least half its recipe's tokens",
    ),
    "code": (("code_generation",), 0.0, "a Python code model (code_generation), shortened to the budget"),
    "chat": (("chat",), 0.0, "a chat model (chat), shortened to the budget"),
    "summarization": (("summarization",), 0.0, "a summarizer (summarization), shortened to the budget"),
}


# -- the presets and their recipes -------------------------------------------------------------------------------
def preset_names() -> list[str]:
    """The presets in ``conf/preset/``, in order of size (the default ``tiny`` first), the task presets last."""
    found = sorted(p.stem for p in (config_root() / "preset").glob("*.yaml"))
    return [n for n in SIZE_ORDER if n in found] + [n for n in found if n not in SIZE_ORDER]


def check_name(name: str) -> Path:
    """The preset's file; an unknown name is a ConfigError listing the presets."""
    path = config_root() / "preset" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"preset {name!r}: no such preset in {path.parent}; presets: {', '.join(preset_names())}")
    return path


@dataclasses.dataclass
class Header:
    """What a preset's opening comment says: its description and the numbers it quotes."""

    description: str
    parameters: int | None
    tokens_per_step: int | None
    total_tokens: int | None
    steps: int | None


def read_header(name: str) -> Header:
    """The first comment line after ``# @package`` is the description; the ``# parameters: ...`` line the numbers."""
    comments = []
    for line in check_name(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            comments.append(line)
    description = comments[0].lstrip("# ").strip() if comments else ""
    numbers = next((m for m in map(HEADER_NUMBERS.match, comments) if m), None)
    values = [int(v.replace(",", "")) for v in numbers.groups()] if numbers else [None] * 4
    return Header(description, *values)


def compose_preset(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``conf/train.yaml`` with ``preset=<name>`` and ``overrides``, as ``python train.py`` composes it; a value it
    refuses is a ConfigError naming the preset and the overrides."""
    check_name(name)
    try:
        return compose_train([f"preset={name}", *overrides])
    except ConfigError as e:
        raise ConfigError(f"preset {' '.join([name, *overrides])}: {e}") from None


@dataclasses.dataclass
class Recipe:
    """A composed preset's size and budget: the numbers its header quotes."""

    name: str
    description: str
    parameters: int
    micro_batch: int
    accumulate: int
    context: int
    devices: int
    steps: int
    optimization: str = ""  # "adamw lr 5e-3, warmup_cosine": the optimizer and schedule options, with learning rates

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.accumulate * self.context * self.devices

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step


def recipe(name: str, cfg: DictConfig) -> Recipe:
    """Parameters counted on the built model (on the meta device: no memory, no time), tokens from the batch."""
    with torch.device("meta"):
        parameters = GPT2Model(model_config(cfg)).num_parameters()
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    return Recipe(
        name=name,
        description=read_header(name).description,
        parameters=parameters,
        micro_batch=cfg.data.batch_size,
        accumulate=cfg.trainer.accumulate_grad_batches,
        context=cfg.model.context_length,
        devices=max(devices, 1) * cfg.trainer.num_nodes,
        steps=cfg.trainer.max_steps,
        optimization=optimization(cfg),
    )


def optimization(cfg: DictConfig) -> str:
    """The optimizer and schedule options a composed config uses, named as on the command line, with the rates."""
    optimizer = cfg.optimizer
    name = OPTIMIZER_OPTIONS.get(optimizer._target_, optimizer._target_)
    rates = f"lr {optimizer.lr:g}" + (f", muon_lr {optimizer.muon_lr:g}" if "muon_lr" in optimizer else "")
    target = (cfg.get("scheduler") or {}).get("_target_")
    schedule = SCHEDULE_OPTIONS.get(target, target) if target else "constant lr"
    return f"{name} ({rates}), {schedule}"


def _short(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


# -- gpt2lab presets ls -----------------------------------------------------------------------------------------
def estimate_rows(names: Sequence[str], overrides: Sequence[str] = (), refresh: bool = False) -> list[dict[str, Any]]:
    """One row per preset: its recipe and its estimated time on this machine (measured, or from the cache)."""
    rows = []
    for name in names:
        cfg = compose_preset(name, overrides)
        r = recipe(name, cfg)
        if refresh or not is_cached(cfg):
            print(f"Measuring {name} on {device_name(probe_device(cfg)[0])} ...", file=sys.stderr, flush=True)
        probe = measure_throughput(cfg, refresh=refresh, label=name)
        rows.append({"recipe": r, "probe": probe, "seconds": run_seconds(cfg, probe), "cfg": cfg})
    return rows


def format_rows(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The presets table: as aligned text, or as Markdown for a README."""
    cells = [
        [
            r["recipe"].name,
            r["recipe"].description,
            _short(r["recipe"].parameters),
            f"{_short(r['recipe'].total_tokens)} ({_short(r['recipe'].tokens_per_step)})",
            r["recipe"].optimization,
            format_duration(r["seconds"]),
            "cached" if r["probe"].cached else "measured now",
        ]
        for r in rows
    ]
    return table(COLUMNS, cells, markdown=markdown, align=ALIGN)


def list_presets(
    names: Sequence[str] | None = None, overrides: Sequence[str] = (), refresh: bool = False, markdown: bool = False
) -> str:
    """``gpt2lab presets ls``: the table, then how the times were measured."""
    for name in names or []:
        check_name(name)
    rows = estimate_rows(names or preset_names(), overrides, refresh)
    devices = sorted({r["probe"].device for r in rows})
    notes = "\n".join(f"  {r['recipe'].name}: {r['probe'].method}" for r in rows)
    return (
        f"{format_rows(rows, markdown)}\n\n"
        f"Estimated training + validation time on {', '.join(devices)} (data preparation and the test not "
        f"included), from a measured probe of each preset's model, cached in {cache_file(rows[0]['cfg'])} "
        f"(--refresh measures again):\n{notes}"
    )


# -- gpt2lab presets cp -----------------------------------------------------------------------------------------
def copy_preset(name: str, new_name: str) -> Path:
    """``gpt2lab presets cp``: the preset as ``conf/experiment/<new_name>.yaml``, a recipe of your own to edit; an
    existing file is never replaced. It drops the default preset (tiny), so that ``experiment=<new_name>``
    composes what ``preset=<name>`` does."""
    source = check_name(name)
    lines = source.read_text().splitlines()
    first_setting = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    header, body = lines[:first_setting], lines[first_setting:]
    package = [line for line in header if line.startswith("# @package")]
    comments = [line for line in header if not line.startswith("# @package")]
    note = [f"# Copied from conf/preset/{name}.yaml by `gpt2lab presets cp`: python train.py experiment={new_name}"]
    if "defaults:" not in body:
        raise ConfigError(f"{source}: a preset opens its settings with a defaults list")
    at = body.index("defaults:") + 1
    body[at:at] = ["  - override /preset: null     # this file is the whole recipe: no default preset under it"]
    return write_experiment(new_name, "\n".join([*package, *note, *comments, *body]) + "\n")


# -- gpt2lab presets --recommend --------------------------------------------------------------------------------
def recommend(goal: str, hours: float, overrides: Sequence[str] = (), refresh: bool = False) -> str:
    """``--recommend goal=... time_budget_hours=...``: the preset for the goal that the budget trains, and why."""
    if goal not in GOALS:
        raise ConfigError(f"goal={goal!r}: expected one of {', '.join(GOALS)}")
    if not hours > 0:
        raise ConfigError(f"time_budget_hours={hours}: expected a positive number of hours")
    candidates, min_share, what = GOALS[goal]
    available = [n for n in candidates if n in preset_names()]
    if not available:
        raise ConfigError(f"goal={goal}: none of its presets ({', '.join(candidates)}) is in conf/preset/")
    rows = estimate_rows(available, overrides, refresh)
    budget = hours * 3600
    # The most ambitious preset that the budget trains on at least min_share of its recipe; else the cheapest.
    pick = next((row for row in rows if row["seconds"] * min_share <= budget), rows[-1])
    r, seconds = pick["recipe"], pick["seconds"]
    command = f"python train.py preset={r.name}"
    if not torch.cuda.is_available() and pick["cfg"].trainer.accelerator in ("gpu", "cuda"):
        command += " trainer=cpu"  # this machine has no GPU: the estimate is the CPU's
    command += "".join(f" {o}" for o in overrides)
    if seconds <= budget:
        why = f"its whole recipe ({_short(r.total_tokens)} tokens) takes an estimated {format_duration(seconds)} here"
    else:
        command += f" trainer.time_budget={_budget_arg(hours)}"
        share = budget / seconds
        why = (
            f"its whole recipe takes an estimated {format_duration(seconds)} here; the budget trains {share:.0%} of "
            f"its {_short(r.total_tokens)} tokens, with warmup and cosine decay fitted to the budget (trainer.time_budget)"
        )
        if share < 0.1:
            why += ": a small share, so expect a weak model (a GPU, or a longer budget, trains more of it)"
    others = ", ".join(f"{o['recipe'].name} {format_duration(o['seconds'])}" for o in rows)
    needs, offline = unmet_needs(pick["cfg"])  # what the run downloads at its start and cannot here
    return (
        f"Recommended for goal={goal} in {format_duration(budget)}: {r.name} ({r.description})\n"
        f"  {command}\n"
        + (f"{needs_first(needs, offline)}\n" if needs else "")
        + f"Why: {why}. The goal {goal} means {what}.\n"
        f"Estimates on {pick['probe'].device} (training + validation, measured): {others}"
    )


def recommend_from(options: Sequence[str], refresh: bool = False) -> str:
    """``--recommend`` given as ``key=value`` words: ``goal`` (default learning) and ``time_budget_hours``; the
    other words are config overrides."""
    given = dict(option.split("=", 1) for option in options if "=" in option)
    overrides = [o for o in options if o.split("=", 1)[0] not in ("goal", "time_budget_hours")]
    try:
        hours = float(given.get("time_budget_hours", ""))
    except ValueError:
        raise ConfigError(
            f"time_budget_hours={given.get('time_budget_hours')!r}: expected a number of hours, e.g. "
            "--recommend goal=learning time_budget_hours=5"
        ) from None
    return recommend(given.get("goal", "learning"), hours, overrides, refresh)


def _budget_arg(hours: float) -> str:
    """Hours as trainer.time_budget reads them: 5h, 1h30m, 45m."""
    h, m = divmod(max(1, round(hours * 60)), 60)
    return f"{h}h{m}m" if h and m else f"{h}h" if h else f"{m}m"
