"""The throughput probe: how long a run's optimizer step and validation batch take on this machine, measured.

The probe times a few optimizer steps of the run's model (forward, backward, the run's optimizer) on random tokens,
at the run's micro-batch and context, in its precision, on the GPU when there is one (else the CPU), eagerly (a ``compile=true``
run is faster). A model that would take too long on a CPU is timed in parts on fewer windows: the model with one
decoder block, and one block alone; every block costs the same, so the step of L blocks is the first plus L - 1
times the second, scaled to the whole micro-batch. Results are cached per device and per probed config under
``paths.cache_dir`` (``GPT2LAB_CACHE_DIR``), so the second time is quick.

``gpt2lab presets`` (``catalog``) estimates each recipe's time from it; ``trainer.time_budget`` fits a run's steps
to a budget with ``steps_for_budget``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from gpt2lab.errors import ConfigError
from gpt2lab.lit.cpu_threads import use_free_cores
from gpt2lab.lit.optimization import build_optimizer
from gpt2lab.lit.speed import precision_dtype, synchronize
from gpt2lab.model import DecoderBlock, GPT2Config, GPT2Model

PROBE_VERSION = 2  # part of the cache key: a change to how the probe measures invalidates old results
CPU_PROBE_TOKENS = 1024  # tokens per probed micro-batch on a CPU (at least one window)
CPU_PROBE_FLOPS = 5e10  # a model whose probe step costs more is probed in parts on a CPU (see _measure)

Timings = tuple[float, float, float]  # seconds: forward + backward of a micro-batch, optimizer step, evaluation forward


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
class Probe:
    """Measured times of one run's steps on one device."""

    device: str
    step_s: float  # one optimizer step: accumulate x (forward + backward of a micro-batch) + the optimizer's step
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
        "optimizer": [cfg.optimizer.get("_target_"), cfg.optimizer.get("ns_steps")],  # Muon's step costs more
        "torch": torch.__version__,
    }


def probe_key(cfg: DictConfig) -> str:
    """The cache key: this device's name and a hash of everything the probe's result depends on."""
    settings = _probe_settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return f"{settings['device']}|{digest}"


def cache_file(cfg: DictConfig) -> Path:
    return Path(str(cfg.paths.cache_dir)).expanduser() / "throughput" / "probes.json"


def is_cached(cfg: DictConfig) -> bool:
    """Whether this run's probe on this device is in the cache (``measure_throughput`` would not measure)."""
    return probe_key(cfg) in _read_cache(cache_file(cfg))


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
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    eval_batch = cfg.data.eval_batch_size or batch
    accumulate = cfg.trainer.accumulate_grad_batches
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cpu":
        # As the run itself would: the cores other processes leave free, for the probe only
        with use_free_cores() as threads:
            probe_batch = max(1, min(batch, CPU_PROBE_TOKENS // config.context_length))
            with torch.device("meta"):
                flops = GPT2Model(config).flops_per_token() * probe_batch * config.context_length
            # A step of more than CPU_PROBE_FLOPS (a second or more here): the model with one block, and one block on
            # its own, each timed; every block costs the same, so t(L) = t(model with 1 block) + (L - 1) * t(block).
            # Two direct timings rather than the difference of two models', which a busy CPU's noise would swamp.
            if layers > 1 and flops > CPU_PROBE_FLOPS:
                one = _time_step(model_config(cfg, 1), probe_batch, device, dtype, 3, 1, min, optimizer=optimizer)
                block = _time_step(config, probe_batch, device, dtype, 3, 1, min, block=True, optimizer=optimizer)
                fb, opt, fwd = (m + (layers - 1) * b for m, b in zip(one, block, strict=True))
                how = f"the model with 1 block and 1 block alone, extrapolated to {layers}; "
            else:
                fb, opt, fwd = _time_step(config, probe_batch, device, dtype, 3, 1, min, optimizer=optimizer)
                how = ""
            method = (
                f"{how}{probe_batch} x {config.context_length} tokens per micro-batch, scaled to {batch} x "
                f"{accumulate}; {dtype_name}, {threads} thread(s)"
            )
    else:
        probe_batch = batch
        while True:  # a micro-batch that does not fit: half of it, timed, then scaled
            try:
                fb, opt, fwd = _time_step(config, probe_batch, device, dtype, steps=5, warmup=2, optimizer=optimizer)
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


def _time_step(
    config: GPT2Config,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    steps: int,
    warmup: int,
    reduce: Callable[[list[float]], float] = statistics.median,
    block: bool = False,
    optimizer: dict[str, Any] | None = None,
) -> Timings:
    """``reduce`` (median; min on a shared CPU, whose other processes only ever add time) of each part of a step:
    of the model, or with ``block`` of one decoder block (``_subject``), stepped by the run's ``optimizer`` config
    (default: AdamW)."""
    module, loss_fn = _subject(config, batch, device, block)
    optimizer_cfg = optimizer or {"_target_": "torch.optim.AdamW", "lr": 1e-4, "fused": None}
    optimizer = build_optimizer(module, optimizer_cfg, device, grad_scaler=False)  # AdamW, or Muon beside AdamW
    autocast = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)

    def now() -> float:
        synchronize(device)
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
        del module, loss_fn, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fb, opt, fwd = (reduce(list(column)) for column in zip(*times, strict=True))
    return fb, opt, fwd


def _subject(
    config: GPT2Config, batch: int, device: torch.device, block: bool
) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """What a probed step runs, and its loss: the model on random tokens (a step's time does not depend on which
    tokens), or one decoder block on random activations, the gradient flowing back to its input as in the model."""
    torch.manual_seed(0)
    if block:
        layer = DecoderBlock(config).to(device)
        x = torch.randn(batch, config.context_length, config.d_model, device=device, requires_grad=True)
        return layer, lambda: layer(x).float().square().mean()
    model = GPT2Model(config).to(device)
    tokens = torch.randint(config.vocab_size, (batch, config.context_length + 1), device=device)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    return model, lambda: model(inputs, labels)[1]


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
