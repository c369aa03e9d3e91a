"""Tier 1, critical: what must hold before any GPU hour goes into a model.

Each check takes a ``Subject`` and returns a ``CheckResult``; a failure here means the model is broken
(wrong shapes, parameters that never learn, NaNs, a model that reads the future), a warning that it is
unusual (an initialisation off GPT-2's, a loss at init far from ln(vocab)).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import defaultdict

import torch
from torch import nn

from gpt2lab.checkup.subject import FAIL, PASS, SKIP, WARN, CheckResult, Subject, finite, fmt, nbytes
from gpt2lab.lit.speed import synchronize

LOGIT_STD_AT_INIT = 2.0  # above this the softmax at init is far from uniform and the loss starts high
LOSS_AT_INIT_TOLERANCE = 0.1  # relative distance from ln(vocab) that still passes
INIT_STD_TOLERANCE = 0.25  # relative distance from the configured std that still passes
CAUSAL_TOLERANCE = 1e-5  # logits change by float rounding at most, relative to their scale


def shape_robustness(s: Subject) -> CheckResult:
    """Logits of shape (B, T, vocab) and a scalar finite loss for every batch size and length up to the
    context, and a sequence longer than the context refused with an error rather than silently cut."""
    lengths = s.config.seq_lengths or [1, s.context // 2 + 1, s.context]
    lengths = sorted({min(max(1, t), s.context) for t in lengths})
    problems, shapes = [], []
    with s.mode(training=False) as model, torch.no_grad():
        for batch in s.config.batch_sizes:
            for length in lengths:
                ids = s.tokens(batch, length + 1)
                logits, loss = model(ids[:, :-1], ids[:, 1:], return_logits=True)
                shapes.append([batch, length])
                if tuple(logits.shape) != (batch, length, s.vocab_size):
                    problems.append(f"input ({batch}, {length}) gave logits {tuple(logits.shape)}")
                elif not finite(logits) or loss.dim() != 0 or not finite(loss):
                    problems.append(f"input ({batch}, {length}) gave non-finite logits or loss {loss}")
        try:
            model(s.tokens(1, s.context + 1))
            too_long = "accepted (it should be refused)"
        except (ValueError, IndexError, RuntimeError) as e:
            too_long = f"refused ({type(e).__name__})"
    details = {"shapes": shapes, "vocab_size": s.vocab_size, f"length {s.context + 1}": too_long}
    if problems:
        return CheckResult("shape robustness", 1, FAIL, "; ".join(problems[:3]), details)
    if not s.gpt2 and not too_long.startswith("refused"):  # a training window, not a limit of the architecture
        too_long = "accepted (the training window of model=hf / model=module)"
    status = PASS if too_long.startswith("refused") or not s.gpt2 else WARN
    summary = (
        f"{len(shapes)} inputs from (1, 1) to ({max(s.config.batch_sizes)}, {s.context}): logits (B, T, "
        f"{s.vocab_size}), finite; length {s.context + 1} {too_long}"
    )
    return CheckResult("shape robustness", 1, status, summary, details)


def gradient_flow(s: Subject) -> CheckResult:
    """Every parameter gets a finite, non-zero gradient from the loss. A frozen parameter
    (``requires_grad=False``) or one without a gradient (a branch whose output is never used) fails."""
    ids = s.tokens(2, s.probe_length + 1)
    with s.mode(training=True) as model:
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        frozen, missing, nonfinite, zero, norms = [], [], [], [], {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                frozen.append(name)
            elif p.grad is None:
                missing.append(name)
            elif not finite(p.grad):
                nonfinite.append(name)
            else:
                norms[name] = float(p.grad.norm())
                if norms[name] == 0.0:
                    zero.append(name)
    details = {
        "loss": loss.item(),
        "grad_norms": norms,
        "frozen": frozen,
        "no_gradient": missing,
        "non_finite": nonfinite,
        "zero": zero,
    }
    problems = [
        (frozen, "frozen (requires_grad=False)"),
        (missing, "with no gradient (not connected to the loss: an output never used?)"),
        (nonfinite, "with a non-finite gradient"),
        (zero, "with a zero gradient"),
    ]
    failed = [
        f"{len(names)} parameters {what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
        for names, what in problems
        if names
    ]
    if failed:
        return CheckResult("gradient flow", 1, FAIL, "; ".join(failed), details)
    low, high = min(norms, key=norms.get), max(norms, key=norms.get)
    summary = (
        f"all {len(norms)} parameters get finite non-zero gradients (norm {fmt(norms[low])} at {low} "
        f"to {fmt(norms[high])} at {high})"
    )
    return CheckResult("gradient flow", 1, PASS, summary, details)


def output_stability(s: Subject) -> CheckResult:
    """Finite logits for random, all-first and all-last token inputs; at initialisation, a logit scale small
    enough that the softmax starts near uniform."""
    n = s.probe_length
    inputs = {
        "random": s.tokens(2, n),
        "all token 0": torch.zeros(1, n, dtype=torch.long, device=s.device),
        f"all token {s.vocab_size - 1}": torch.full((1, n), s.vocab_size - 1, device=s.device),
    }
    stats, bad = {}, []
    with s.mode(training=False) as model, torch.no_grad():
        for what, ids in inputs.items():
            logits = model(ids)[0].float()
            if not finite(logits):
                bad.append(what)
                stats[what] = {"non_finite": int((~torch.isfinite(logits)).sum())}
                continue
            stats[what] = {"std": float(logits.std()), "max_abs": float(logits.abs().max())}
    details = {"logits": stats, "trained": s.trained}
    if bad:
        return CheckResult("output stability", 1, FAIL, f"NaN or Inf logits for inputs: {', '.join(bad)}", details)
    std, max_abs = stats["random"]["std"], max(v["max_abs"] for v in stats.values())
    summary = f"finite logits on 3 inputs; logit std {fmt(std)}, max |logit| {fmt(max_abs)}"
    if not s.trained and std > LOGIT_STD_AT_INIT:
        return CheckResult(
            "output stability", 1, WARN,
            f"{summary}: large for an initialised model (softmax far from uniform; expected std < {LOGIT_STD_AT_INIT})",
            details,
        )  # fmt: skip
    return CheckResult("output stability", 1, PASS, summary + ("" if s.trained else " (near uniform at init)"), details)


def loss_at_init(s: Subject) -> CheckResult:
    """An initialised model predicts all tokens about equally: its loss on random tokens is near ln(vocab)."""
    expected = math.log(s.vocab_size)
    if s.trained:
        return CheckResult(
            "loss at init", 1, SKIP, f"a trained checkpoint: the ln(vocab) = {expected:.2f} expectation does not apply"
        )
    ids = s.tokens(4, s.probe_length + 1)
    with s.mode(training=False) as model, torch.no_grad():
        loss = float(model(ids[:, :-1], ids[:, 1:])[1])
    details = {"loss": loss, "ln_vocab": expected}
    summary = f"loss {loss:.3f} vs ln({s.vocab_size}) = {expected:.3f}"
    if not math.isfinite(loss):
        return CheckResult("loss at init", 1, FAIL, summary, details)
    if abs(loss - expected) > LOSS_AT_INIT_TOLERANCE * expected:
        return CheckResult(
            "loss at init", 1, WARN, f"{summary}: off by more than {LOSS_AT_INIT_TOLERANCE:.0%}", details
        )
    return CheckResult("loss at init", 1, PASS, summary, details)


def causality(s: Subject) -> CheckResult:
    """Changing the token at position t leaves every logit before t unchanged, and changes the logits at t."""
    n = s.probe_length
    if n < 2:
        return CheckResult("causality", 1, SKIP, f"context {n}: no earlier position to compare")
    positions = sorted({1, n // 2, n - 1})
    base = s.tokens(1, n)
    batch = base.repeat(len(positions) + 1, 1)
    for row, t in enumerate(positions, start=1):
        batch[row, t] = (batch[row, t] + 1 + row) % s.vocab_size
    with s.mode(training=False) as model, torch.no_grad():
        logits = model(batch)[0].float()
    if not finite(logits):
        return CheckResult("causality", 1, FAIL, "NaN or Inf logits: causality cannot be told (see output stability)")
    scale = float(logits[0].abs().max()) or 1.0
    leaks, deaf, changes = [], [], {}
    for row, t in enumerate(positions, start=1):
        diff = (logits[row] - logits[0]).abs().amax(-1)  # (T,): largest change per position
        before, at = float(diff[:t].max()), float(diff[t])
        changes[t] = {"max_change_before": before, "change_at": at}
        if before > CAUSAL_TOLERANCE * scale:
            first = int((diff[:t] > CAUSAL_TOLERANCE * scale).nonzero()[0])
            leaks.append(f"token {t} changed the logits at position {first} (by {fmt(before)})")
        if not at > 0:
            deaf.append(t)
    details = {"positions_changed": changes, "tolerance": CAUSAL_TOLERANCE * scale}
    if leaks:
        return CheckResult("causality", 1, FAIL, "the model sees the future: " + "; ".join(leaks), details)
    if deaf:
        return CheckResult(
            "causality", 1, WARN, f"no earlier logit changes, but changing token {deaf} did not change its own logits",
            details,
        )  # fmt: skip
    summary = f"changing token {positions} leaves all earlier logits unchanged (max {fmt(max(c['max_change_before'] for c in changes.values()))})"
    return CheckResult("causality", 1, PASS, summary, details)


def expected_init(model: nn.Module, module: nn.Module, param: str) -> tuple[float, float] | None:
    """GPT-2's initial (mean, std) of a parameter (``GPT2Model._init_weights``), or None if it has none."""
    config = model.config
    if isinstance(module, nn.LayerNorm):
        return (1.0, 0.0) if param == "weight" else (0.0, 0.0)
    if isinstance(module, nn.Linear | nn.Embedding):
        if param == "bias":
            return 0.0, 0.0
        std = config.initializer_range
        if getattr(module, "is_residual_projection", False):
            std /= math.sqrt(2 * config.num_layers)
        return 0.0, std
    return None


def init_statistics(s: Subject) -> CheckResult:
    """Mean, std and extremes of the parameters per layer type (``blocks.*.attn.qkv.weight``), beside GPT-2's
    initialisation for an initialised model; non-finite values fail."""
    model = s.model
    groups: dict[str, list[torch.Tensor]] = defaultdict(list)
    owners: dict[str, tuple[nn.Module, str]] = {}
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights: counted once
                continue
            seen.add(id(p))
            kind = re.sub(r"\.\d+\.", ".*.", f"{module_name}.{param_name}")
            groups[kind].append(p.detach().float().flatten())
            owners[kind] = (module, param_name)
    rows, nonfinite, off = {}, [], []
    for kind, tensors in groups.items():
        values = torch.cat(tensors)
        ok = torch.isfinite(values)
        if not bool(ok.all()):
            nonfinite.append(f"{kind} ({int((~ok).sum())} of {values.numel()})")
            values = values[ok]
        row = {
            "count": sum(t.numel() for t in tensors),
            "mean": float(values.mean()) if values.numel() else math.nan,
            "std": float(values.std()) if values.numel() > 1 else 0.0,
            "min": float(values.min()) if values.numel() else math.nan,
            "max": float(values.max()) if values.numel() else math.nan,
        }
        expected = None if s.trained or not s.gpt2 else expected_init(model, *owners[kind])
        if expected is not None:
            row["expected_mean"], row["expected_std"] = expected
            mean, std = expected
            if abs(row["std"] - std) > INIT_STD_TOLERANCE * std + 1e-6 or abs(row["mean"] - mean) > 0.1 * std + 1e-6:
                off.append(f"{kind} (std {fmt(row['std'])}, expected {fmt(std)})")
        rows[kind] = row
    details = {"per_layer_type": rows}
    if nonfinite:
        return CheckResult("init statistics", 1, FAIL, "NaN or Inf in " + ", ".join(nonfinite), details)
    what = f"{len(rows)} layer types"
    if off:
        return CheckResult(
            "init statistics", 1, WARN, f"{what}; off GPT-2's initialisation: " + ", ".join(off), details
        )
    if s.trained or not s.gpt2:
        why = "trained weights" if s.trained else "no reference initialisation for this architecture"
        return CheckResult("init statistics", 1, PASS, f"{what}, all finite ({why}: reported only)", details)
    return CheckResult("init statistics", 1, PASS, f"{what}, all finite and as GPT-2 initialises them", details)


def memory_footprint(s: Subject) -> CheckResult:
    """Bytes of the parameters, their gradients, AdamW's two moments, and the activations a training step
    keeps for its backward at ``batch_size`` x context (measured at batch 1 with saved-tensor hooks, which
    see what autograd really keeps, then scaled: activations grow linearly with the batch)."""
    model = s.model
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    trainable = [p for p in params if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    adam_bytes = sum(2 * p.numel() * 4 for p in trainable)  # exp_avg and exp_avg_sq, fp32
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = s.tokens(1, s.context + 1)
    with s.mode(training=True) as m, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = m(ids[:, :-1], ids[:, 1:])
    del loss
    activation_bytes = sum(saved.values()) * s.config.batch_size
    total = param_bytes + grad_bytes + adam_bytes + activation_bytes
    available = device_memory(s.device)
    details = {
        "batch": [s.config.batch_size, s.context],
        "parameters": param_bytes,
        "gradients": grad_bytes,
        "adamw_state": adam_bytes,
        "activations": activation_bytes,
        "total": total,
        "device_memory": available,
        "num_parameters": sum(p.numel() for p in params),
    }
    summary = (
        f"{nbytes(total)} at batch {s.config.batch_size} x {s.context}: parameters {nbytes(param_bytes)}, "
        f"gradients {nbytes(grad_bytes)}, AdamW {nbytes(adam_bytes)}, activations {nbytes(activation_bytes)}"
    )
    if available and total > 0.9 * available:
        return CheckResult(
            "memory footprint", 1, WARN, f"{summary}: more than 90% of the {nbytes(available)} on {s.device}", details
        )
    return CheckResult("memory footprint", 1, PASS, summary, details)


def device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (the machine's RAM for the CPU), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def forward_throughput(s: Subject) -> CheckResult:
    """Forward tokens/s at ``batch_size`` x context, without gradients, after a warm-up sequence."""
    ids = s.tokens(s.config.batch_size, s.context)
    with s.mode(training=False) as model, torch.no_grad():
        model(ids[:1])
        synchronize(s.device)
        started, batches = time.perf_counter(), 0
        while batches == 0 or time.perf_counter() - started < s.config.throughput_seconds:  # a time budget, not repeats
            model(ids)
            synchronize(s.device)
            batches += 1
        seconds = time.perf_counter() - started
    tokens_per_s = batches * ids.numel() / seconds
    details = {"tokens_per_s": tokens_per_s, "batch": list(ids.shape), "batches": batches, "seconds": seconds}
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n > 1 else ''}" if s.device.type == "cpu" else ""
    summary = f"{tokens_per_s:,.0f} tokens/s forward at batch {ids.shape[0]} x {ids.shape[1]} on {s.device}{threads}"
    return CheckResult("forward tokens/s", 1, PASS, summary, details)


CHECKS = [
    shape_robustness,
    gradient_flow,
    output_stability,
    loss_at_init,
    causality,
    init_statistics,
    memory_footprint,
    forward_throughput,
]
