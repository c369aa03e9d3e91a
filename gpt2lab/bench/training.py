"""``python -m gpt2lab.bench``: training-step speed and memory, measured through the real training path.

Every measurement is a short ``gpt2lab.train.train(cfg)`` run (Lightning Trainer, callbacks, logger,
memory-mapped data) with validation, checkpoints and the test switched off. ``StepTimer`` marks the start
of each optimizer step with a CUDA event, so the timed steps have no host sync of their own.
``--reference`` runs the plain-PyTorch baseline script in the same invocation, on the same GPU, before
gpt2lab's runs, and prints its numbers beside them; its variant ``gpt2lab-model`` is gpt2lab's model in
the reference's own loop, which tells the model's cost from the Lightning path's. ``--memory`` finds, per
model size, the largest micro-batch that fits with and without gradient checkpointing. It measures only while
other processes leave the CPU cores free (``bench.machine``), and each table says how busy they were.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from gpt2lab.bench import machine
from gpt2lab.config import compose_train
from gpt2lab.console import table
from gpt2lab.errors import ConfigError
from gpt2lab.lit.speed import describe_load, peak_flops, precision_dtype, synchronize

DEFAULT_OVERRIDES = ["preset=small"]
MEMORY_MODELS = ["gpt2", "gpt2-medium", "gpt2-large"]
REFERENCE_LOOP_VARIANT = "gpt2lab-model"  # gpt2lab's model in the reference script's own loop


class StepTimer(pl.Callback):
    """Times optimizer steps with CUDA events recorded at the start of each one and writes the median,
    tokens/s, MFU, peak memory and compile time to ``out`` (rank 0) when training ends."""

    def __init__(self, out: str, warmup: int = 10) -> None:
        self.out = Path(out)
        self.warmup = warmup
        self._marks: list[Any] = []
        self._batch_shape: tuple[int, int] = (0, 0)
        self._started = 0.0
        self._first_step_s: float | None = None

    def _mark(self) -> Any:
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def _seconds(a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(trainer.strategy.root_device)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._started = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx % trainer.accumulate_grad_batches == 0:  # the first micro-batch of an optimizer step
            self._marks.append(self._mark())
        self._batch_shape = (batch.shape[0], batch.shape[1] - 1)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._first_step_s is None and not trainer.fit_loop._should_accumulate():
            synchronize(trainer.strategy.root_device)  # once, after the first step: compilation and warm-up end here
            self._first_step_s = time.perf_counter() - self._started

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        synchronize(trainer.strategy.root_device)
        steps = [self._seconds(a, b) for a, b in zip(self._marks, self._marks[1:], strict=False)][self.warmup :]
        if not trainer.is_global_zero or not steps:
            return
        step_s = statistics.median(steps)
        micro_batch, seq_len = self._batch_shape
        tokens_per_step = micro_batch * seq_len * trainer.accumulate_grad_batches * trainer.world_size
        model = pl_module.model
        device = trainer.strategy.root_device
        peak = peak_flops(device, precision_dtype(trainer.precision))
        tokens_per_sec = tokens_per_step / step_s
        result = {
            "micro_batch": micro_batch,
            "accumulate": trainer.accumulate_grad_batches,
            "world_size": trainer.world_size,
            "seq_len": seq_len,
            "parameters": model.num_parameters(),
            "flops_per_token": model.flops_per_token(),
            "steps_timed": len(steps),
            "step_ms": round(step_s * 1e3, 2),
            "tokens_per_sec": round(tokens_per_sec),
            "mfu": round(tokens_per_sec * model.flops_per_token() / (peak * trainer.world_size), 4) if peak else None,
            "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "compile_s": round(max((self._first_step_s or 0.0) - step_s, 0.0), 1),
            "peak_flops": peak,
        }
        self.out.write_text(json.dumps(result))


def measure(overrides: list[str], micro_batch: int, steps: int, warmup: int, accumulate: int) -> dict[str, Any]:
    """One short training run through ``gpt2lab.train.train``; the StepTimer's figures."""
    from gpt2lab.train.run import train

    workdir = Path(tempfile.mkdtemp(prefix="gpt2lab-bench-"))
    try:
        cfg = compose_train(
            [
                *overrides,
                f"data.batch_size={micro_batch}",
                f"trainer.accumulate_grad_batches={accumulate}",
                f"trainer.max_steps={warmup + steps + 1}",
                "trainer.limit_val_batches=0",
                "trainer.num_sanity_val_steps=0",
                "trainer.enable_checkpointing=false",
                "validate_at_start=false",
                "test=false",
                "sample=null",
                f"paths.output_dir={workdir}",
                "+callbacks.step_timer._target_=gpt2lab.bench.training.StepTimer",
                f"+callbacks.step_timer.out={workdir / 'bench.json'}",
                f"+callbacks.step_timer.warmup={warmup}",
            ]
        )
        train(cfg)
        out = workdir / "bench.json"
        return json.loads(out.read_text()) if out.is_file() else {}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _is_out_of_memory(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
        e = e.__cause__
    return False


def largest_micro_batch(overrides: list[str], capacity_gb: float) -> dict[str, Any]:
    """Peak memory at micro-batch 1 and 2 gives the static memory (weights, gradients, AdamW state) and the
    activation memory per sequence; their line predicts the largest micro-batch, which a run then confirms
    (stepping down 10% at a time on out-of-memory)."""

    def peak(b: int) -> float | None:
        try:
            return measure(overrides, b, steps=1, warmup=1, accumulate=1)["peak_mem_gb"]
        except ConfigError as e:
            if _is_out_of_memory(e):
                return None
            raise

    p1, p2 = peak(1), peak(2)
    if p1 is None or p2 is None:
        return {"largest_micro_batch": 0 if p1 is None else 1}
    per_sequence = max(p2 - p1, 1e-3)
    static = p1 - per_sequence
    guess = max(int((capacity_gb * 0.97 - static) / per_sequence), 2)
    while guess > 2 and peak(guess) is None:
        guess = int(guess * 0.9)
    return {
        "largest_micro_batch": guess,
        "static_gb": round(static, 2),
        "activation_gb_per_sequence": round(per_sequence, 3),
    }


def run_reference(
    script: Path, variant: str, micro_batch: int, steps: int, overrides: list[str] | None = None
) -> dict[str, Any]:
    """One variant of the reference script (``nano``, ``nano_compile``, ``hf``, ``hf_compile``), in a
    subprocess on the same GPU; its JSON line. ``gpt2lab-model`` is gpt2lab's model (from ``overrides``) in
    the script's own loop (``gpt2lab.bench.reference_loop``)."""
    env = {**os.environ, "B": str(micro_batch), "STEPS": str(steps)}
    if variant == REFERENCE_LOOP_VARIANT:
        # --busy-ok: this bench checked the cores before it started its runs
        command = [sys.executable, "-m", "gpt2lab.bench.reference_loop", str(script), "--busy-ok", *(overrides or [])]
    else:
        command = [sys.executable, str(script), variant]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"name"')]
    if proc.returncode or not rows:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"name": variant, "B": micro_batch, "error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return rows[0]


def environment() -> str:
    """The device, its count and the versions that matter, for the first line of the output."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    cuda = f", CUDA {torch.version.cuda}" if torch.cuda.is_available() else ""
    return (
        f"{device} x{max(torch.cuda.device_count(), 1)}; torch {torch.__version__}{cuda}, "
        f"Lightning {pl.__version__}, Python {platform.python_version()}"
    )


COLUMNS = (
    "run", "micro-batch", "params", "tokens/s", "MFU", "step ms (median)", "peak GB", "compile+warm-up s",
    "vs reference",
)  # fmt: skip
MEMORY_COLUMNS = ("model", "gradient checkpointing", "largest micro-batch", "static GB", "activations GB/sequence")
MEMORY_KEYS = ("model", "gradient_checkpointing", "largest_micro_batch", "static_gb", "activation_gb_per_sequence")


def row(name: str, r: dict[str, Any], baseline: float | None = None) -> list[Any]:
    """A row of the table for gpt2lab's figures or the reference script's (whose keys differ)."""
    if "error" in r:
        return [name, r.get("B", ""), "", f"failed: {r['error']}", "", "", "", "", ""]
    tok = r.get("tokens_per_sec") or r.get("tok_s")
    mfu = r.get("mfu") if "mfu" in r else r.get("mfu_989")
    params = r.get("params_M") or round(r.get("parameters", 0) / 1e6, 1)
    return [
        name, r.get("micro_batch") or r.get("B"), f"{params}M", f"{tok:,}", "" if mfu is None else f"{mfu:.1%}",
        r["step_ms"], r.get("peak_mem_gb") or r.get("peak_mem_GB") or "", r.get("compile_s", r.get("warmup_s", "")),
        f"{tok / baseline:.2f}x" if baseline else "",
    ]  # fmt: skip


def micro_batches_to_measure(args: argparse.Namespace) -> list[int]:
    """The micro-batch sizes of the command line (by default the config's ``data.batch_size``), once it is checked:
    a ``ConfigError`` says what is wrong before anything runs."""
    for name, least in {"micro_batch": 1, "steps": 1, "warmup": 0, "accumulate": 1}.items():
        value = getattr(args, name)
        if value is not None and min(value if isinstance(value, list) else [value]) < least:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {least}")
    if args.json and not args.json.parent.is_dir():
        raise ConfigError(f"--json {args.json}: the directory {args.json.parent} does not exist")
    cfg = compose_train(args.overrides)
    if args.reference and not args.reference.is_file():
        raise ConfigError(
            f"--reference {args.reference}: no such file (the baseline script is reference_step.py; gpt2lab's "
            "developers keep it in ../shared/gpu/ beside the repository)"
        )
    if args.memory and not torch.cuda.is_available():
        raise ConfigError("--memory measures GPU memory; this machine has no CUDA GPU")
    micro_batches = args.micro_batch or [cfg.data.batch_size]
    several_devices = str(cfg.trainer.devices) not in ("1", "[0]") or cfg.trainer.num_nodes > 1
    if several_devices and (len(micro_batches) > 1 or args.memory):
        raise ConfigError(
            "with several devices, measure one --micro-batch per invocation (each run relaunches its ranks); "
            "--memory is single-device"
        )
    return micro_batches


def bench(args: argparse.Namespace) -> int:
    """``python -m gpt2lab.bench`` with its parsed command line: each micro-batch measured (the reference's
    variants first, on rank 0), ``--memory``'s search, then the tables; the exit status."""
    overrides = args.overrides
    try:
        micro_batches = micro_batches_to_measure(args)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    is_rank_zero = os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    results: dict[str, Any] = {"environment": environment(), "overrides": overrides, "runs": [], "reference": []}
    if is_rank_zero:
        print(f"# {results['environment']}\n# overrides: {' '.join(overrides)}", flush=True)
    try:
        # Rank 0 checks the cores for all: the ranks it launches start while it is running (they skip the check).
        if is_rank_zero:
            gpu = torch.cuda.is_available() and compose_train(overrides).trainer.accelerator != "cpu"
            results["busy_share"] = {"start": machine.wait_for_free_cores(args.busy_ok, args.busy_wait, gpu=gpu)}
        for mb in micro_batches:
            if args.reference and is_rank_zero:
                for variant in args.reference_variants:
                    results["reference"].append(run_reference(args.reference, variant, mb, args.steps, overrides))
            results["runs"].append(measure(overrides, mb, args.steps, args.warmup, args.accumulate))
        if args.memory:
            results["memory"] = memory_search(overrides, args.models)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    if not is_rank_zero:
        return 0
    results["busy_share"]["end"] = machine.busy_share()
    load = describe_load(results["busy_share"]["start"], results["busy_share"]["end"])
    rows = []
    refs = {(r.get("name"), r.get("B")): r for r in results["reference"]}
    for mb, run in zip(micro_batches, results["runs"], strict=True):
        for variant in args.reference_variants if args.reference else []:
            rows.append(row(f"reference {variant}", refs.get((variant, mb), {"error": "no result", "name": variant})))
        base = refs.get((args.reference_variants[0], mb), {}).get("tok_s") if args.reference else None
        if run:
            rows.append(row(f"gpt2lab x{run['world_size']}", run, base))
    print(table(COLUMNS, rows, markdown=True, align=["left"] + ["right"] * (len(COLUMNS) - 1)))
    print(load)
    if results.get("memory"):
        memory = [[m.get(key, "") for key in MEMORY_KEYS] for m in results["memory"]]
        print("\n" + table(MEMORY_COLUMNS, memory, markdown=True, align=["left"] + ["right"] * 4))
        print(load)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def memory_search(overrides: list[str], models: list[str]) -> list[dict[str, Any]]:
    """``--memory``: the largest micro-batch of each model size, without and with gradient checkpointing (each row
    printed as JSON as it is found: the search takes minutes)."""
    capacity = torch.cuda.get_device_properties(0).total_memory / 2**30
    memory = []
    for model in models:
        for checkpointing in (False, True):
            settings = [f"model={model}", f"model.gradient_checkpointing={checkpointing}", "compile=false"]
            found = largest_micro_batch([*overrides, *settings], capacity)
            memory.append({"model": model, "gradient_checkpointing": checkpointing, **found})
            print(f"\n{json.dumps(memory[-1])}", flush=True)
    return memory
