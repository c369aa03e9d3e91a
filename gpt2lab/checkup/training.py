"""Tier 3, training: the model can learn. A few AdamW steps on one fixed batch must lower its loss, and a
4-point learning-rate grid must find a learning rate whose loss stays finite.

Each run trains a copy of the model, so the model under check is left as it was. The loop is plain PyTorch
(the check is about the model, not the training pipeline: ``python train.py trainer.fast_dev_run=true``
exercises that).
"""

from __future__ import annotations

import copy
import math

import torch
from matplotlib.figure import Figure

from gpt2lab.checkup.subject import FAIL, PASS, WARN, CheckResult, Subject, fmt

MIN_DECREASE = 0.05  # the fine-tuned loss must be this much (relative) below the initial one to pass


def train_copy(s: Subject, lr: float, steps: int) -> tuple[float, list[float], float]:
    """Train a copy of the model for ``steps`` AdamW steps on one fixed batch. Returns the eval-mode loss on
    that batch before and after, and the loss of each step between (stopping early at a non-finite one)."""
    ids = s.tokens(4, s.probe_length + 1, seed_offset=4)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    model = copy.deepcopy(s.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    torch.manual_seed(s.config.seed)  # dropout masks

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(inputs, labels)[1].item()

    before, losses = eval_loss(), []
    model.train()
    for _ in range(steps):
        _, loss = model(inputs, labels)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            return before, losses, losses[-1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    return before, losses, eval_loss()


def fine_tuning(s: Subject) -> CheckResult:
    """``finetune_steps`` steps at ``finetune_lr`` on a fixed batch lower its loss."""
    lr, steps = s.config.finetune_lr, s.config.finetune_steps
    first, losses, last = train_copy(s, lr, steps)
    details = {"lr": lr, "loss_before": first, "step_losses": losses, "loss_after": last}
    files = plot_losses(s, "training/finetune.png", {f"lr {lr:g}": [first, *losses[1:], last]}, "fine-tuning")
    summary = f"{len(losses)} steps at lr {lr:g} on a fixed batch: loss {fmt(first)} -> {fmt(last)}"
    if not math.isfinite(last) or not last < first:
        return CheckResult("fine-tuning", 3, FAIL, f"{summary}: the loss did not go down", details, files)
    if last > (1 - MIN_DECREASE) * first:
        return CheckResult("fine-tuning", 3, WARN, f"{summary}: less than {MIN_DECREASE:.0%} lower", details, files)
    return CheckResult("fine-tuning", 3, PASS, f"{summary} ({last / first - 1:+.0%})", details, files)


def learning_rate_search(s: Subject) -> CheckResult:
    """Each of ``lr_trials`` trains a fresh copy for ``lr_trial_steps``; the best is the lowest finite final loss."""
    trials = {lr: train_copy(s, lr, s.config.lr_trial_steps) for lr in s.config.lr_trials}
    final = {lr: after for lr, (_, _, after) in trials.items()}
    finite_trials = {lr: loss for lr, loss in final.items() if math.isfinite(loss)}
    details = {"final_loss": {str(lr): loss for lr, loss in final.items()}, "steps": s.config.lr_trial_steps}
    curves = {f"lr {lr:g}": [before, *losses[1:], after] for lr, (before, losses, after) in trials.items()}
    files = plot_losses(s, "training/lr_search.png", curves, "learning-rate search")
    diverged = [f"{lr:g}" for lr in final if lr not in finite_trials]
    if not finite_trials:
        return CheckResult(
            "learning-rate search", 3, FAIL, f"every trial diverged (lr {', '.join(diverged)})", details, files
        )
    best = min(finite_trials, key=finite_trials.get)
    details["best_lr"] = best
    summary = (
        f"{len(trials)} trials of {s.config.lr_trial_steps} steps: best lr {best:g} (loss {fmt(final[best])}); "
        + ", ".join(f"{lr:g}: {fmt(loss)}" for lr, loss in final.items())
    )
    if best in (min(final), max(final)):
        summary += "; the best is at the edge of the grid"
    return CheckResult("learning-rate search", 3, PASS, summary, details, files)


def plot_losses(s: Subject, name: str, curves: dict[str, list[float]], title: str) -> list[str]:
    if s.output_dir is None:
        return []
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    for label, losses in curves.items():
        ax.plot(range(len(losses)), losses, label=label, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on the fixed batch")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    path = s.figure_path(name)
    fig.savefig(path, dpi=100)
    return [str(path.relative_to(s.output_dir))]


CHECKS = [fine_tuning, learning_rate_search]
