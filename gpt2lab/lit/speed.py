"""How fast: a device's peak FLOP/s (the denominator of MFU), the matmul dtype of a precision setting, and the one
timing helper, the median of repeated timed runs with the device synchronised around each; and how busy other
processes keep the CPU cores (``busy_share``), in the same words under every table that reports a speed.

Here, below the library verbs, because training reports throughput and MFU (``callbacks.ThroughputLogger``), an
export can time itself (``exporters.speed``) and the benchmarks (``gpt2lab.bench``) measure all of it the same way.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
from lightning_fabric.utilities.throughput import get_available_flops

from gpt2lab.lit import cpu_threads

# Dense bf16/fp16 tensor-core peaks (datasheets, without the 2:4 sparsity doubling). Lightning's own table
# lists the H200 at its sparse figure and does not match the plain "NVIDIA H200" device name.
DENSE_16BIT_FLOPS = {"h200": 989.5e12, "h100 pcie": 756e12, "h100": 989.5e12, "a100": 312e12, "l4": 121e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for ``dtype`` matmuls, the denominator of MFU; None if unknown."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device).lower()
        for chip, flops in DENSE_16BIT_FLOPS.items():
            if all(word in name for word in chip.split()):
                return flops
    return get_available_flops(device, dtype)


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision setting (``bf16-mixed`` -> bfloat16)."""
    precision = str(precision)
    return torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32


def synchronize(device: torch.device | None) -> None:
    """Wait for the work queued on a CUDA ``device`` (a host clock read after it is honest); nothing elsewhere."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    *runs: Callable[[], object], repeats: int, device: torch.device | None = None, warmup: int = 1
) -> list[float]:
    """The median wall-clock seconds of each of ``runs`` over ``repeats`` timed calls, after ``warmup`` untimed
    ones each (allocator, kernels, compilation, CUDA graph capture). The runs take turns, so that a burst of load
    from other processes falls on all of them alike; on a CUDA ``device`` each call is timed from an idle device to
    its end, not just its launch."""
    for run in runs:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, seconds in zip(runs, times, strict=True):
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    return [statistics.median(seconds) for seconds in times]


def busy_share(interval_s: float = 1.0) -> float:
    """The share (0 to 1) of this process's CPU cores that *other* processes kept busy over ``interval_s``: the busy
    time ``/proc/stat`` counts on those cores (``cpu_threads.busy_cores``) less this process's own CPU time, so that
    a benchmark's own threads (PyTorch's OpenMP threads spin after each operator) do not count against it. Where
    there is no ``/proc/stat``, the 1-minute load average per core, which counts this process too. The load average
    is no measure on a quiet Linux machine: a kernel thread in uninterruptible sleep reads 0.7 on 2 idle cores."""
    cores = cpu_threads.process_cores()
    if not os.path.exists("/proc/stat"):
        return min(os.getloadavg()[0] / len(cores), 1.0) if hasattr(os, "getloadavg") else 0.0
    own, wall = time.process_time(), time.perf_counter()
    busy = cpu_threads.busy_cores(cores, interval_s)
    own = (time.process_time() - own) / max(time.perf_counter() - wall, 1e-9)
    return min(max(busy - own, 0.0) / len(cores), 1.0)


def describe_load(at_start: float | None, at_end: float | None = None) -> str:
    """The load a table was measured at, in the same words under every table: how much of the cores other processes
    kept busy (``busy_share``) at the start and at the end."""
    readings = [(share, moment) for share, moment in ((at_start, "start"), (at_end, "end")) if share is not None]
    if not readings:
        return "load: not measured"
    (share, moment), *rest = readings
    cores = len(cpu_threads.process_cores())
    return f"load: other processes kept {share:.0%} of the {cores} CPU cores busy at the {moment}" + "".join(
        f", {share:.0%} at the {moment}" for share, moment in rest
    )
