"""What every benchmark checks about the machine before and beside its figures: that other processes leave the CPU
cores free (a guard, shared by every ``python -m gpt2lab.bench`` command), and the physical limit of decoding (the
memory bandwidth over the bytes of weights each new token reads).

Why a guard: a ratio measured on a shared machine measures which program suffers more from sharing. PyTorch's
OpenMP threads spin at the end of every operator while one of them waits for a descheduled core; on the 2-core
development machine that alone turned gpt2lab's 1.06x over transformers' decoding into 5.9x (issue 33). So a bench
reads how busy other processes keep the cores (``lit.speed.busy_share``: ``/proc/stat`` over 1 s, the bench's own
process left out), waits a bounded time for them to be free, and otherwise stops, naming ``--busy-ok``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from time import monotonic, perf_counter, sleep

import torch

from gpt2lab.errors import ConfigError
from gpt2lab.lit.cpu_threads import process_cores
from gpt2lab.lit.speed import busy_share, synchronize

# A CPU bench runs one OpenMP thread per core, and every operator waits for the slowest: any core that others hold
# shows in the figures. 10% leaves room for the background a quiet machine has (daemons, kernel threads: a few % of 2
# cores here, where the 1-minute load average reads 0.7) and refuses a test suite or a training run, which holds a
# whole core (50% of 2 cores). On a GPU the device does the arithmetic and the host needs a core or two: one thread
# launches every kernel (eager decoding and a training step are launch-bound at small batches) and a few feed data.
# Others holding half of the cores would take those from it on the machines GPUs come in (16 cores or more).
CPU_BUSY_LIMIT = 0.10
GPU_BUSY_LIMIT = 0.50
DEFAULT_WAIT_S = 60.0
POLL_S = 5.0  # between readings while waiting (each reading itself takes busy_share's 1 s)

# Peak memory bandwidth of GPUs (datasheets); a CPU's is measured (copy_bandwidth).
GPU_BANDWIDTH = {"h200": 4.8e12, "h100": 3.35e12, "a100": 2.0e12}
COPY_BYTES = 2**30
COPY_REPEATS = 5


def add_busy_options(parser: argparse.ArgumentParser) -> None:
    """The guard's options, the same on every bench command."""
    parser.add_argument(
        "--busy-ok",
        action="store_true",
        help="measure even while other processes keep the CPU cores busy (the tables say how busy)",
    )
    parser.add_argument(
        "--busy-wait",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help=f"how long to wait for busy cores to be free before stopping (default: {DEFAULT_WAIT_S:g})",
    )


def wait_for_free_cores(busy_ok: bool = False, wait_s: float = DEFAULT_WAIT_S, gpu: bool = False) -> float:
    """The share of the CPU cores other processes keep busy, once it is at most the bench's limit
    (``GPU_BUSY_LIMIT`` on a GPU, else ``CPU_BUSY_LIMIT``): read now, then every ``POLL_S`` for at most ``wait_s``
    seconds (plus one reading). A ``ConfigError`` naming ``--busy-ok`` if the cores stay busy; with ``busy_ok``,
    the share read now, however high (the tables print it)."""
    if wait_s < 0:
        raise ConfigError(f"--busy-wait {wait_s:g}: expected 0 or more seconds")
    limit = GPU_BUSY_LIMIT if gpu else CPU_BUSY_LIMIT
    rule = f"a {'GPU' if gpu else 'CPU'} bench measures at {limit:.0%} or less"
    share = busy_share()
    if share <= limit:
        return share
    if busy_ok:
        print(f"Measuring anyway (--busy-ok): {busy(share)}", file=sys.stderr, flush=True)
        return share
    if wait_s:
        print(f"Busy machine: {busy(share)}, and {rule}. Waiting up to {wait_s:g} s for them to be free (--busy-wait)",
              file=sys.stderr, flush=True)  # fmt: skip
    deadline = monotonic() + wait_s
    while (left := deadline - monotonic()) > 0:
        sleep(min(POLL_S, left))
        share = busy_share()
        if share <= limit:
            print(f"Measuring now: {busy(share)}", file=sys.stderr, flush=True)
            return share
    raise ConfigError(
        f"the machine stayed busy: {busy(share)} after {wait_s:g} s of waiting, and {rule} (on shared cores it "
        "would measure the sharing); --busy-ok measures anyway, --busy-wait SECONDS waits longer"
    )


def busy(share: float) -> str:
    """``share`` (``busy_share``) in words, for the guard's messages."""
    return f"other processes keep {share:.0%} of the {len(process_cores())} CPU cores busy"


def copy_bandwidth(device: torch.device | None = None, nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> float:
    """Bytes per second that copying a large buffer (1 GiB, far past any cache) moves on ``device``, counted as
    STREAM's copy counts them: the bytes read plus the bytes written. The median of ``repeats`` copies after one
    that touches the pages; torch's copy runs on all of its threads, as decoding does."""
    device = device or torch.device("cpu")
    source = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = perf_counter()
        target.copy_(source)
        synchronize(device)
        seconds.append(perf_counter() - start)
    return 2 * nbytes / statistics.median(seconds)


def memory_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """The bandwidth that bounds decoding on ``device``, and where it comes from: a known GPU's datasheet peak,
    else this machine's measured copy bandwidth (``copy_bandwidth``)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        peak = next((bw for chip, bw in GPU_BANDWIDTH.items() if chip in name), None)
        if peak:
            return peak, "the datasheet's peak"
    return copy_bandwidth(device), f"this machine's copy bandwidth, {COPY_BYTES / 2**30:g} GiB copied"


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """The bytes of weights one decoding step reads at batch 1: every parameter once (tied ones once), less the
    embedding tables only looked up (one row each: positions), in the dtype the model holds them."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - linear
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in lookups)


def onnx_weight_bytes_per_token(path: str | Path) -> int:
    """``weight_bytes_per_token`` of an ONNX graph: the bytes of its initializers (int8 ones one byte per weight),
    less those only ``Gather`` reads (embedding lookups; a quantized graph keeps a float32 table for the tokens'
    lookup beside its int8 output matrix)."""
    import numpy as np
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    return sum(
        int(np.prod(t.dims, dtype=np.int64)) * np.dtype(tensor_dtype_to_np_dtype(t.data_type)).itemsize
        for t in graph.initializer
        if consumers.get(t.name, set()) - {"Gather"}
    )


def limit_line(limit: float, weight_bytes: int, bandwidth: float, source: str) -> str:
    """The sentence under a decoding table that says where the limit comes from (same words on CPUs and GPUs)."""
    return (
        f"Batch 1 bound by memory bandwidth: {limit:,.0f} tokens/s ({weight_bytes / 1e9:.2f} GB of weights read per "
        f"token at {bandwidth / 1e9:,.1f} GB/s, {source})"
    )
