"""``python -m gpt2lab.presets`` (``gpt2lab presets``): the recipes in ``conf/preset/``, what each one costs, and
how long it would train on this machine, from a short measured probe of its model on this device.

    gpt2lab presets ls                                   # name, description, parameters, tokens, time here
    gpt2lab presets cp small my_recipe                   # conf/experiment/my_recipe.yaml, to edit
    gpt2lab presets --recommend goal=learning time_budget_hours=5

The probe times a few optimizer steps of the preset's model (forward, backward, AdamW) on random tokens, at the
preset's micro-batch and context, in its precision, on the GPU when there is one (else the CPU), eagerly (a
``compile=true`` run is faster). A model that would take too long on a CPU is timed in parts on fewer windows:
the model with one decoder block, and one block alone; every block costs the same, so the step of L blocks is
the first plus L - 1 times the second, scaled to the whole micro-batch. Results are cached per device and per
probed config under ``paths.cache_dir`` (``GPT2LAB_CACHE_DIR``), so the table is quick the second time.
``trainer.time_budget`` (gpt2lab/lit/trainer.py) uses the same probe to fit a run's steps to a budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.resources
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt2lab.config import config_path, null_group_overrides, register_schemas
from gpt2lab.errors import ConfigError
from gpt2lab.lit.callbacks import format_duration, precision_dtype
from gpt2lab.lit.cpu_threads import use_free_cores
from gpt2lab.model import DecoderBlock, GPT2Config, GPT2Model

PROBE_VERSION = 2  # part of the cache key: a change to how the probe measures invalidates old results
CPU_PROBE_TOKENS = 1024  # tokens per probed micro-batch on a CPU (at least one window)
CPU_PROBE_FLOPS = 5e10  # a model whose probe step costs more is probed in parts on a CPU (see _measure)
HEADER_NUMBERS = re.compile(
    r"#\s*parameters:\s*([\d,]+)\s*\|\s*tokens/step:\s*([\d,]+).*\|\s*total:\s*([\d,]+) tokens \(([\d,]+) steps\)"
)

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
def config_root() -> Path:
    """The config tree as a directory: ``conf/`` of a source checkout, else the installed ``gpt2lab.conf``."""
    path = config_path()
    return Path(str(importlib.resources.files("gpt2lab.conf"))) if path.startswith("pkg://") else Path(path)


def preset_names() -> list[str]:
    """The presets in ``conf/preset/``, in order of size (the default ``tiny`` first), the task presets last."""
    order = ["tiny", "small", "medium", "large", "code_generation", "chat", "summarization"]
    found = sorted(p.stem for p in (config_root() / "preset").glob("*.yaml"))
    return [n for n in order if n in found] + [n for n in found if n not in order]


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
    """``conf/train.yaml`` with ``preset=<name>`` and ``overrides``, as ``python train.py`` composes it."""
    check_name(name)
    register_schemas()
    GlobalHydra.instance().clear()
    path = config_path()
    init = initialize_config_module("gpt2lab.conf") if path.startswith("pkg://") else initialize_config_dir(path)
    try:
        with init:
            return compose("train", overrides=null_group_overrides([f"preset={name}", *overrides]))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise ConfigError(f"preset {name} {' '.join(overrides)}: {e}{cause}".replace("  ", " ")) from e
    finally:
        GlobalHydra.instance().clear()


def model_config(cfg: DictConfig, num_layers: int | None = None) -> GPT2Config:
    """The run's GPT2Config, its vocabulary the tokenizer's when ``model.vocab_size`` is null."""
    if not str(cfg.model.get("_target_", "")).startswith("gpt2lab.model"):
        raise ConfigError(
            f"model={cfg.model.get('_target_')}: the throughput probe measures gpt2lab's GPT-2; for other models set "
            "trainer.max_steps and trainer.max_time instead of trainer.time_budget"
        )
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    fields.pop("_target_", None)
    fields["vocab_size"] = fields.get("vocab_size") or cfg.tokenizer.vocab_size
    fields["init_from"] = None  # the probe times the architecture; where the weights start does not matter
    if num_layers is not None:
        fields["num_layers"] = num_layers
    return GPT2Config(**fields)


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
    )


# -- the throughput probe -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Probe:
    """Measured times of one run's steps on one device."""

    device: str
    step_s: float  # one optimizer step: accumulate x (forward + backward of a micro-batch) + AdamW
    eval_batch_s: float  # one validation batch (forward only)
    method: str  # how it was measured, in words
    preset: str = ""
    measured_at: str = ""
    cached: bool = False


def probe_device(cfg: DictConfig) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision the run's steps would run: its GPU when it asks for one (or ``auto``) and this
    machine has one, else the CPU, in fp32 unless the run chose a CPU precision itself (``trainer=cpu``)."""
    accelerator = str(cfg.trainer.accelerator)
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda"), precision_dtype(cfg.trainer.precision)
    return torch.device("cpu"), precision_dtype(cfg.trainer.precision) if accelerator == "cpu" else torch.float32


def device_name(device: torch.device) -> str:
    """The device as the cache keys it: the GPU's name, or the CPU's model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def _probe_settings(cfg: DictConfig) -> dict[str, Any]:
    device, dtype = probe_device(cfg)
    return {
        "version": PROBE_VERSION,
        "device": device_name(device),
        "dtype": str(dtype),
        "model": dataclasses.asdict(model_config(cfg)),
        "micro_batch": cfg.data.batch_size,
        "eval_batch": cfg.data.eval_batch_size or cfg.data.batch_size,
        "accumulate": cfg.trainer.accumulate_grad_batches,
        "torch": torch.__version__,
    }


def probe_key(cfg: DictConfig) -> str:
    """The cache key: this device's name and a hash of everything the probe's result depends on."""
    settings = _probe_settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return f"{settings['device']}|{digest}"


def cache_file(cfg: DictConfig) -> Path:
    return Path(str(cfg.paths.cache_dir)).expanduser() / "throughput" / "probes.json"


def measure_throughput(cfg: DictConfig, refresh: bool = False, label: str = "") -> Probe:
    """The run's step times on this device: from the cache, or measured now (and cached). Concurrent processes
    (DDP ranks, sweep workers) measure once: the others wait for the file lock and read the result."""
    path, key = cache_file(cfg), probe_key(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        cache = _read_cache(path)
        if key in cache and not refresh:
            fields = {f.name for f in dataclasses.fields(Probe)} - {"cached"}
            return Probe(**{k: v for k, v in cache[key].items() if k in fields}, cached=True)
        probe = _measure(cfg)
        probe.preset, probe.measured_at = label, time.strftime("%Y-%m-%d %H:%M:%S")
        cache[key] = {k: v for k, v in dataclasses.asdict(probe).items() if k != "cached"}
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    return probe


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or damaged: measure again


def _measure(cfg: DictConfig) -> Probe:
    device, dtype = probe_device(cfg)
    config = model_config(cfg)
    layers, batch = config.num_layers, cfg.data.batch_size
    eval_batch = cfg.data.eval_batch_size or batch
    accumulate = cfg.trainer.accumulate_grad_batches
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cpu":
        threads = use_free_cores()  # as the run itself would: the cores other processes leave free
        probe_batch = max(1, min(batch, CPU_PROBE_TOKENS // config.context_length))
        with torch.device("meta"):
            flops = GPT2Model(config).flops_per_token() * probe_batch * config.context_length
        # A step of more than CPU_PROBE_FLOPS (a second or more here): the model with one block, and one block on its
        # own, each timed; every block costs the same, so t(L) = t(model with 1 block) + (L - 1) * t(block). Two
        # direct timings rather than the difference of two models', which a busy CPU's noise would swamp.
        if layers > 1 and flops > CPU_PROBE_FLOPS:
            one = _time_model(model_config(cfg, 1), probe_batch, device, dtype, steps=3, warmup=1, reduce=min)
            block = _time_block(config, probe_batch, device, dtype, steps=3, warmup=1, reduce=min)
            fb, opt, fwd = (m + (layers - 1) * b for m, b in zip(one, block, strict=True))
            how = f"the model with 1 block and 1 block alone, extrapolated to {layers}; "
        else:
            fb, opt, fwd = _time_model(config, probe_batch, device, dtype, steps=3, warmup=1, reduce=min)
            how = ""
        method = (
            f"{how}{probe_batch} x {config.context_length} tokens per micro-batch, scaled to {batch} x {accumulate}; "
            f"{dtype_name}, {threads} thread(s)"
        )
    else:
        probe_batch = batch
        while True:  # a micro-batch that does not fit: half of it, timed, then scaled
            try:
                fb, opt, fwd = _time_model(config, probe_batch, device, dtype, steps=5, warmup=2)
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if probe_batch == 1:
                    raise ConfigError(
                        f"{config.num_layers} layers x {config.d_model} does not fit one window of "
                        f"{config.context_length} tokens on {device_name(device)}: set "
                        "model.gradient_checkpointing=true or use trainer=fsdp"
                    ) from None
                probe_batch //= 2
        scaled = f" (out of memory at {batch}: {probe_batch}, scaled)" if probe_batch != batch else ""
        method = f"{probe_batch} x {config.context_length} tokens per micro-batch{scaled}, x {accumulate}; "
        method += f"{dtype_name}, eager (compile=true runs faster)"
    return Probe(
        device=device_name(device),
        step_s=accumulate * fb * batch / probe_batch + opt,
        eval_batch_s=fwd * eval_batch / probe_batch,
        method=method,
    )


Timings = tuple[float, float, float]  # seconds: forward + backward of a micro-batch, AdamW step, evaluation forward


def _time_model(
    config: GPT2Config,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    warmup: int,
    reduce: Callable[[list[float]], float] = statistics.median,
) -> Timings:
    """The model's step on random tokens (the time of a step does not depend on which tokens)."""
    torch.manual_seed(0)
    model = GPT2Model(config).to(device)
    tokens = torch.randint(config.vocab_size, (batch, config.context_length + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    return _time(model, lambda: model(inputs, labels)[1], device, dtype, steps, warmup, reduce)


def _time_block(
    config: GPT2Config,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    warmup: int,
    reduce: Callable[[list[float]], float] = statistics.median,
) -> Timings:
    """One decoder block's step on random activations, with the gradient flowing back to its input as in the model."""
    torch.manual_seed(0)
    block = DecoderBlock(config).to(device)
    x = torch.randn(batch, config.context_length, config.d_model, device=device, requires_grad=True)
    return _time(block, lambda: block(x).float().square().mean(), device, dtype, steps, warmup, reduce)


def _time(
    module: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    warmup: int,
    reduce: Callable[[list[float]], float],
) -> Timings:
    """``reduce`` (median; min on a shared CPU, whose other processes only ever add time) of each part of a step."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    times: list[Timings] = []
    try:
        for i in range(warmup + steps):
            t0 = now()
            with autocast():
                loss = loss_fn()
            loss.backward()
            t1 = now()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t2 = now()
            module.eval()
            with torch.no_grad(), autocast():
                loss_fn()
            t3 = now()
            module.train()
            if i >= warmup:
                times.append((t1 - t0, t2 - t1, t3 - t2))
    finally:
        del module, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fb, opt, fwd = (reduce(list(column)) for column in zip(*times, strict=True))
    return fb, opt, fwd


# -- estimates ------------------------------------------------------------------------------------------------------
def validation_batches(cfg: DictConfig, steps: int) -> int:
    """Validation batches a run of ``steps`` optimizer steps reads: every ``val_check_interval`` micro-batches,
    at the last step, and at step 0 (``validate_at_start``). A fractional ``limit_val_batches`` depends on
    the data's size, unknown here: not counted."""
    limit, interval = cfg.trainer.limit_val_batches, cfg.trainer.val_check_interval
    if not isinstance(limit, int) or not isinstance(interval, int) or interval <= 0:
        return 0
    micro_batches = steps * cfg.trainer.accumulate_grad_batches
    checks = micro_batches // interval + (1 if micro_batches % interval else 0) + (1 if cfg.validate_at_start else 0)
    return checks * limit


def run_seconds(cfg: DictConfig, probe: Probe, steps: int | None = None) -> float:
    """Training and validation time of the run (data preparation and the final test not included)."""
    steps = cfg.trainer.max_steps if steps is None else steps
    return steps * probe.step_s + validation_batches(cfg, steps) * probe.eval_batch_s


def steps_for_budget(cfg: DictConfig, seconds: float, probe: Probe) -> tuple[int, str]:
    """The most optimizer steps whose training and validation fit in ``seconds``; and why, in words."""
    if seconds <= 0:
        raise ConfigError(f"trainer.time_budget: {seconds:g} s leaves no time to train")
    steps = max(1, int(seconds / probe.step_s))
    while steps > 1 and run_seconds(cfg, probe, steps) > seconds:  # validation takes its share
        steps = max(1, int(steps * seconds / run_seconds(cfg, probe, steps)))
    why = (
        f"{probe.step_s:.3g} s per step measured on {probe.device}"
        f"{' (cached)' if probe.cached else ''}, {probe.eval_batch_s:.3g} s per validation batch"
    )
    return steps, why


DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str, key: str = "time_budget") -> float:
    """Seconds in ``90s``, ``10m``, ``2h``, ``1h30m``, ``1d``, ``HH:MM:SS``, ``DD:HH:MM:SS`` (Lightning's max_time)
    or a plain number of seconds."""
    value = str(text).strip().lower().replace(" ", "")
    seconds: float | None = None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif re.fullmatch(r"\d+(:\d{1,2}){1,3}", value):
        parts = [int(p) for p in value.split(":")]
        if all(p < 60 for p in parts[1:]) and (len(parts) < 4 or parts[1] < 24):
            seconds = float(sum(p * u for p, u in zip(reversed(parts), (1, 60, 3600, 86400), strict=False)))
    elif value and (match := DURATION.fullmatch(value)) and any(match.groups()):
        seconds = sum(float(v) * u for v, u in zip(match.groups(), (86400, 3600, 60, 1), strict=True) if v)
    if seconds is None or seconds <= 0:
        raise ConfigError(
            f"{key}={text!r}: expected a positive duration such as 90s, 10m, 2h, 1h30m or HH:MM:SS (01:30:00)"
        )
    return seconds


def duration(seconds: float) -> str:
    """``4 min 19 s``, ``6 h 49 min``, ``12 days``, ``3.7 years``: how long, at a glance, however long."""
    if seconds < 48 * 3600:
        return format_duration(seconds)
    days = seconds / 86400
    return f"{days:,.0f} days" if days < 730 else f"{days / 365.25:,.1f} years"


def _short(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


# -- commands -----------------------------------------------------------------------------------------------------
def estimate_rows(names: Sequence[str], overrides: Sequence[str] = (), refresh: bool = False) -> list[dict[str, Any]]:
    """One row per preset: its recipe and its estimated time on this machine (measured, or from the cache)."""
    rows = []
    for name in names:
        cfg = compose_preset(name, overrides)
        r = recipe(name, cfg)
        if not any(key == probe_key(cfg) for key in _read_cache(cache_file(cfg))) or refresh:
            print(f"Measuring {name} on {device_name(probe_device(cfg)[0])} ...", file=sys.stderr, flush=True)
        probe = measure_throughput(cfg, refresh=refresh, label=name)
        rows.append({"recipe": r, "probe": probe, "seconds": run_seconds(cfg, probe), "cfg": cfg})
    return rows


def format_rows(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The presets table: as aligned text, or as Markdown for a README."""
    header = ["preset", "description", "parameters", "tokens (per step)", "est. time here", "probe"]
    cells = [
        [
            r["recipe"].name,
            r["recipe"].description,
            _short(r["recipe"].parameters),
            f"{_short(r['recipe'].total_tokens)} ({_short(r['recipe'].tokens_per_step)})",
            duration(r["seconds"]),
            "cached" if r["probe"].cached else "measured now",
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(header)]
    right = {2, 3, 4}
    return "\n".join(
        "  ".join(
            v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *cells]
    )


def list_presets(
    names: Sequence[str] | None = None, overrides: Sequence[str] = (), refresh: bool = False, markdown: bool = False
) -> str:
    """``gpt2lab presets ls``: the table, then how the times were measured."""
    rows = estimate_rows(names or preset_names(), overrides, refresh)
    devices = sorted({r["probe"].device for r in rows})
    notes = "\n".join(f"  {r['recipe'].name}: {r['probe'].method}" for r in rows)
    return (
        f"{format_rows(rows, markdown)}\n\n"
        f"Estimated training + validation time on {', '.join(devices)} (data preparation and the test not "
        f"included), from a measured probe of each preset's model, cached in {cache_file(rows[0]['cfg'])} "
        f"(--refresh measures again):\n{notes}"
    )


def copy_preset(name: str, new_name: str) -> Path:
    """``gpt2lab presets cp``: the preset as ``conf/experiment/<new_name>.yaml``, a recipe of your own to edit.
    It drops the default preset (tiny), so that ``experiment=<new_name>`` composes what ``preset=<name>`` does."""
    source = check_name(name)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", new_name):
        raise ConfigError(f"{new_name!r}: expected a file name of letters, digits, _ . - (e.g. my_recipe)")
    target = config_root() / "experiment" / f"{new_name}.yaml"
    if target.exists():
        raise ConfigError(f"{target} exists: choose another name, or edit that file (presets cp never overwrites)")
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
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "x") as f:  # "x": never overwrite, even a file written since the check
        f.write("\n".join([*package, *note, *comments, *body]) + "\n")
    return target


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
    budget_text = duration(budget)
    command = f"python train.py preset={r.name}"
    if not torch.cuda.is_available() and pick["cfg"].trainer.accelerator in ("gpu", "cuda"):
        command += " trainer=cpu"  # this machine has no GPU: the estimate is the CPU's
    command += "".join(f" {o}" for o in overrides)
    if seconds <= budget:
        why = f"its whole recipe ({_short(r.total_tokens)} tokens) takes an estimated {duration(seconds)} here"
    else:
        command += f" trainer.time_budget={_budget_arg(hours)}"
        share = budget / seconds
        why = (
            f"its whole recipe takes an estimated {duration(seconds)} here; the budget trains {share:.0%} of "
            f"its {_short(r.total_tokens)} tokens, with warmup and cosine decay fitted to the budget (trainer.time_budget)"
        )
        if share < 0.1:
            why += ": a small share, so expect a weak model (a GPU, or a longer budget, trains more of it)"
    others = ", ".join(f"{o['recipe'].name} {duration(o['seconds'])}" for o in rows)
    return (
        f"Recommended for goal={goal} in {budget_text}: {r.name} ({r.description})\n"
        f"  {command}\n"
        f"Why: {why}. The goal {goal} means {what}.\n"
        f"Estimates on {pick['probe'].device} (training + validation, measured): {others}"
    )


def _budget_arg(hours: float) -> str:
    """Hours as trainer.time_budget reads them: 5h, 1h30m, 45m."""
    h, m = divmod(max(1, round(hours * 60)), 60)
    return f"{h}h{m}m" if h and m else f"{h}h" if h else f"{m}m"


def main(argv: list[str] | None = None) -> None:
    """``gpt2lab presets [ls | cp NAME NEW_NAME] [--recommend goal=G time_budget_hours=H] [overrides]``."""
    parser = argparse.ArgumentParser(
        prog="gpt2lab presets",
        description=(
            "The recipes in conf/preset/ with their size and an estimated training time on this machine, measured "
            "by a short probe of each preset's model on this device (cached). Also python -m gpt2lab.presets."
        ),
        epilog=(
            "examples:\n  gpt2lab presets ls\n  gpt2lab presets ls --only tiny,small\n"
            "  gpt2lab presets cp small my_recipe      # then: python train.py experiment=my_recipe\n"
            "  gpt2lab presets --recommend goal=learning time_budget_hours=5\n"
            f"goals: {', '.join(f'{g} ({w})' for g, (_, _, w) in GOALS.items())}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("args", nargs="*", help="ls (default), or cp NAME NEW_NAME; then config overrides (key=value)")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated presets to list (default: all)")
    parser.add_argument("--refresh", action="store_true", help="measure again, ignoring cached probes")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--recommend", nargs="*", metavar="KEY=VALUE", help="goal=learning|quality|code|chat|summarization and "
        "time_budget_hours=H: the preset that fits, and why",
    )  # fmt: skip
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    words = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    try:
        if args.recommend is not None:
            options = dict(a.split("=", 1) for a in [*args.recommend, *overrides] if "=" in a)
            overrides = [
                a for a in [*args.recommend, *overrides] if a.split("=", 1)[0] not in ("goal", "time_budget_hours")
            ]
            try:
                hours = float(options.get("time_budget_hours", ""))
            except ValueError:
                raise ConfigError(
                    f"time_budget_hours={options.get('time_budget_hours')!r}: expected a number of hours, e.g. "
                    "--recommend goal=learning time_budget_hours=5"
                ) from None
            print(recommend(options.get("goal", "learning"), hours, overrides, args.refresh))
        elif words[:1] == ["cp"]:
            if len(words) != 3:
                raise ConfigError("presets cp takes two names: gpt2lab presets cp small my_recipe")
            target = copy_preset(words[1], words[2])
            print(f"Wrote {target}: edit it, then run it with\n  python train.py experiment={words[2]}")
        elif words in ([], ["ls"]):
            names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
            for name in names or []:
                check_name(name)
            print(list_presets(names, overrides, args.refresh, args.markdown))
        else:
            raise ConfigError(f"presets {' '.join(words)}: expected ls, cp NAME NEW_NAME or --recommend")
    except ConfigError as e:
        parser.exit(1, f"Error: {e}\n")


if __name__ == "__main__":
    main()
