"""CPU thread counts that hold up when the machine is shared.

PyTorch runs its CPU kernels on one OpenMP thread per core, and GNU OpenMP's threads spin while they wait
for each other at the end of every parallel region. When another process holds one of the cores, the
spinning thread waits for a descheduled one at every matmul. On the 2-core development machine, with one
busy process beside it, the tiny preset's step ran at 5.5k tokens/s with 2 threads and 9.4k with 1 (idle:
20.3k and 10.6k). Telling OpenMP to sleep instead (``OMP_WAIT_POLICY=PASSIVE``) fixes the shared case but
costs 16% on an idle machine, and must be set before torch is imported. So a CPU run measures, when it
starts, how many cores other processes keep busy, and uses only the free ones.

The count is torch's, for the whole process, so a run sets it only for its own length: ``use_free_cores()`` is a
context manager that puts the count back when the run ends, failed or not (a notebook that calls ``train_model``
keeps its own count afterwards, and in-process runs do not inherit each other's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)
USER_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def process_cores() -> set[int]:
    """The CPU cores this process may run on (its affinity where the OS has one, else every core)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def busy_cores(cores: set[int], interval_s: float = 0.3) -> float:
    """Cores' worth of CPU time that other processes used on ``cores`` over ``interval_s`` (this process is
    idle while it measures); 0.0 where ``/proc/stat`` cannot be read."""
    try:
        first = _cpu_times(cores)
        time.sleep(interval_s)
        second = _cpu_times(cores)
    except (OSError, ValueError, IndexError):
        return 0.0
    busy = 0.0
    for core in first.keys() & second.keys():
        total = sum(second[core]) - sum(first[core])
        idle = (second[core][3] + second[core][4]) - (first[core][3] + first[core][4])  # idle + iowait
        busy += (total - idle) / total if total > 0 else 0.0
    return busy


def _cpu_times(cores: set[int]) -> dict[int, list[int]]:
    """Per-core time counters (user, nice, system, idle, iowait, ...) of ``cores``, from /proc/stat."""
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                times[int(name[3:])] = [int(v) for v in values]
    return times


@contextlib.contextmanager
def thread_count_restored() -> Iterator[None]:
    """Torch's intra-op thread count as it was before the block, once the block ends (raised or not)."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def use_free_cores() -> Iterator[int]:
    """Within the block, torch's intra-op threads are the cores other processes leave free (at least one), unless
    the user set a thread count; yields the threads in use, and restores the earlier count when the block ends."""
    with thread_count_restored():
        yield set_free_cores()


def set_free_cores() -> int:
    """``use_free_cores``' choice, set for the rest of the process: only for a caller that restores the count
    itself (inside ``thread_count_restored()``, as a training run does); returns the threads in use."""
    threads = torch.get_num_threads()
    if any(os.environ.get(var) for var in USER_SETTINGS):
        return threads
    cores = process_cores()
    available, busy = len(cores), busy_cores(cores)
    free = max(1, min(threads, available - round(busy)))
    if free < threads:
        torch.set_num_threads(free)
        log.warning(
            "Other processes keep %.1f of this machine's %d CPU cores busy: training with %d thread(s) instead of "
            "%d, which is faster when cores are shared (set OMP_NUM_THREADS to choose)",
            busy, available, free, threads,
        )  # fmt: skip
    return free
