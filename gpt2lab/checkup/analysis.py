"""Tier 2, analysis: where the model looks and what its prediction depends on.

Attention probabilities are recomputed from each layer's own q and k, caught by a forward hook on its
``qkv`` projection: the model's forward runs ``F.scaled_dot_product_attention``, which never materialises
them. A hook on the output projection catches what the model's attention really produced, and the check
compares it with ``probabilities @ v``, so the heatmaps are known to show the model's attention.
"""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

from gpt2lab.checkup.subject import FAIL, PASS, SKIP, WARN, CheckResult, Subject, finite, fmt
from gpt2lab.model import GPT2Model, MultiHeadAttention

RECONSTRUCTION_TOLERANCE = 1e-3  # relative: float rounding between SDPA's kernels and the plain softmax
MAX_TICK_LABELS = 40


def prompt_ids(s: Subject) -> tuple[torch.Tensor, list[str]]:
    """(1, T) token ids to analyse and a label per token: the configured prompt if the model has a tokenizer,
    else random tokens (labelled by position)."""
    if s.tokenizer is not None and s.config.prompt:
        ids = s.tokenizer.encode(s.config.prompt).ids[-s.context :]
        if ids:
            labels = [s.tokenizer.decode([i]).replace("\n", "\\n") for i in ids]
            return torch.tensor([ids], device=s.device), labels
    ids = s.tokens(1, s.probe_length, seed_offset=2)
    return ids, [str(i) for i in range(ids.shape[1])]


def attention_probabilities(s: Subject, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
    """Per layer, the (B, heads, T, T) causal attention probabilities computed from the layer's q and k, and
    how far ``probabilities @ v`` is from the attention output the model produced (relative)."""
    layers = [m for m in s.model.modules() if isinstance(m, MultiHeadAttention)]
    qkv_out, attn_out = {}, {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.qkv.register_forward_hook(lambda m, a, out, i=i: qkv_out.__setitem__(i, out)))
        hooks.append(layer.proj.register_forward_pre_hook(lambda m, a, i=i: attn_out.__setitem__(i, a[0])))
    try:
        with s.mode(training=False) as model, torch.no_grad():
            model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    probabilities, errors = [], []
    for i, layer in enumerate(layers):
        B, T, C3 = qkv_out[i].shape
        C, H = C3 // 3, layer.num_heads
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2).float() for t in qkv_out[i].split(C, dim=2))
        scores = q @ k.transpose(-2, -1) / math.sqrt(C // H)  # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1)
        p = scores.masked_fill(future, float("-inf")).softmax(-1)
        reconstructed = (p @ v).transpose(1, 2).reshape(B, T, C)
        actual = attn_out[i].float()
        errors.append(float((reconstructed - actual).abs().max() / actual.abs().max().clamp_min(1e-12)))
        probabilities.append(p)
    return probabilities, errors


def attention_patterns(s: Subject) -> CheckResult:
    """Per-head entropy of the attention probabilities (normalised by that of uniform attention over the
    visible tokens: 1 is uniform, 0 attends to one token), and a heatmap per layer."""
    if not any(isinstance(m, MultiHeadAttention) for m in s.model.modules()):
        return CheckResult(
            "attention patterns", 2, SKIP,
            "the probabilities are read from gpt2lab's GPT-2 attention layers (MultiHeadAttention); this model has none",
        )  # fmt: skip
    ids, labels = prompt_ids(s)
    probabilities, errors = attention_probabilities(s, ids)
    if not all(finite(p) for p in probabilities):
        return CheckResult("attention patterns", 2, FAIL, "NaN or Inf in the attention probabilities")
    T = ids.shape[1]
    visible = torch.arange(1, T + 1, device=ids.device, dtype=torch.float).log()  # ln(keys) per query
    entropy = []  # [layer][head]: mean over the queries that see more than one token
    for p in probabilities:
        h = -(p * p.clamp_min(1e-30).log()).sum(-1)[0]  # (H, T)
        entropy.append((h[:, 1:] / visible[1:]).mean(-1).tolist() if T > 1 else [1.0] * p.shape[1])
    files = plot_attention(s, probabilities, entropy, labels)
    flat = [(e, layer, head) for layer, row in enumerate(entropy) for head, e in enumerate(row)]
    low = min(flat)
    details = {"normalised_entropy": entropy, "reconstruction_error": errors, "tokens": T}
    summary = (
        f"{len(entropy)} layers x {len(entropy[0])} heads on {T} tokens: normalised entropy mean "
        f"{sum(e for e, *_ in flat) / len(flat):.3f}, lowest {low[0]:.3f} (layer {low[1]} head {low[2]})"
    )
    if max(errors) > RECONSTRUCTION_TOLERANCE:
        worst = max(range(len(errors)), key=errors.__getitem__)
        return CheckResult(
            "attention patterns", 2, WARN,
            f"{summary}; layer {worst}'s output is not causal softmax(qk/sqrt(d))v of its own q, k, v "
            f"(relative error {fmt(errors[worst])}): the heatmaps do not show what it computes",
            details, files,
        )  # fmt: skip
    return CheckResult("attention patterns", 2, PASS, summary, details, files)


def plot_attention(
    s: Subject, probabilities: list[torch.Tensor], entropy: list[list[float]], labels: list[str]
) -> list[str]:
    """``attention/layer<i>.png`` (one panel per head) and ``attention/entropy.png`` (layers x heads)."""
    if s.output_dir is None:
        return []
    files = []
    T = len(labels)
    show_tokens = T <= MAX_TICK_LABELS and s.tokenizer is not None
    for i, p in enumerate(probabilities):
        heads = p.shape[1]
        columns = min(heads, 4)
        rows = math.ceil(heads / columns)
        # Constrained layout makes room for the token labels; without them, fixed margins draw 5x faster.
        fig = Figure(figsize=(2.6 * columns, 2.6 * rows + 0.4), layout="constrained" if show_tokens else None)
        if not show_tokens:
            fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.5 / (2.6 * rows + 0.4), hspace=0.2)
        for h, ax in enumerate(fig.subplots(rows, columns, squeeze=False).flat):
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= heads:
                ax.axis("off")
                continue
            ax.imshow(p[0, h].cpu().numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"head {h} (entropy {entropy[i][h]:.2f})", fontsize=8)
            if show_tokens:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=5)
                ax.set_yticks(range(T), labels, fontsize=5)
        fig.suptitle(f"layer {i}: attention probabilities (query row, key column)")
        path = s.figure_path(f"attention/layer{i}.png")
        fig.savefig(path, dpi=100)
        files.append(str(path.relative_to(s.output_dir)))
    fig = Figure(figsize=(1 + 0.6 * len(entropy[0]), 1 + 0.5 * len(entropy)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(entropy, cmap="magma", vmin=0, vmax=1, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("normalised attention entropy", fontsize=9)
    fig.colorbar(image, ax=ax)
    path = s.figure_path("attention/entropy.png")
    fig.savefig(path, dpi=100)
    return [*files, str(path.relative_to(s.output_dir))]


def feature_attribution(s: Subject) -> CheckResult:
    """Gradient x input saliency of each prompt token for the predicted next token: how much of the top
    logit each token's embedding accounts for, to first order."""
    ids, labels = prompt_ids(s)
    embedded = {}

    def keep(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        embedded["x"] = out.detach().requires_grad_()  # a leaf, also when the embedding is frozen
        return embedded["x"]

    embedding = input_embedding(s.model)
    if embedding is None:
        return CheckResult(
            "feature attribution", 2, SKIP, "no token embedding found (no get_input_embeddings(), no nn.Embedding)"
        )
    hook = embedding.register_forward_hook(keep)
    try:
        with s.mode(training=False) as model:
            logits = model(ids)[0][0, -1]
            target = int(logits.argmax())
            logits[target].backward()
    finally:
        hook.remove()
    x = embedded["x"]
    saliency = (x.grad * x.detach()).sum(-1).abs()[0].float()  # (T,)
    target_name = f"{target} {s.tokenizer.decode([target])!r}" if s.tokenizer is not None else str(target)
    details = {"target_token": target_name, "saliency": saliency.tolist(), "tokens": labels}
    if not finite(saliency) or float(saliency.sum()) == 0.0:
        return CheckResult("feature attribution", 2, FAIL, "the saliency is NaN, Inf or zero everywhere", details)
    share = saliency / saliency.sum()
    details["share"] = share.tolist()
    top = share.topk(min(3, len(share))).indices.tolist()
    files = plot_saliency(s, share, labels, target_name)
    tops = ", ".join(f"{i} ({share[i]:.0%})" for i in top)
    summary = f"next token {target_name}: {share[-1]:.0%} of the saliency on the last token; top positions {tops}"
    return CheckResult("feature attribution", 2, PASS, summary, details, files)


def input_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that turns token ids into vectors: GPT-2's ``wte``, a transformers model's
    ``get_input_embeddings()``, else the first ``nn.Embedding`` (a ``model=module`` of yours)."""
    if isinstance(model, GPT2Model):
        return model.wte
    inner = getattr(model, "module", model)
    if callable(getattr(inner, "get_input_embeddings", None)):
        return inner.get_input_embeddings()
    return next((m for m in inner.modules() if isinstance(m, torch.nn.Embedding)), None)


def plot_saliency(s: Subject, share: torch.Tensor, labels: list[str], target: str) -> list[str]:
    if s.output_dir is None:
        return []
    fig = Figure(figsize=(max(4, 0.2 * len(labels)), 3), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(labels)), share.cpu().numpy())
    if len(labels) <= MAX_TICK_LABELS and s.tokenizer is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_xlabel("prompt position")
    ax.set_ylabel("share of |gradient x input|")
    ax.set_title(f"saliency for the next token ({target})", fontsize=9)
    path = s.figure_path("saliency.png")
    fig.savefig(path, dpi=100)
    return [str(path.relative_to(s.output_dir))]


def perturbation_sensitivity(s: Subject) -> CheckResult:
    """How far the next-token distribution moves (total variation) when one prompt token is substituted, at
    random positions: a prediction that never moves ignores its input."""
    ids, _ = prompt_ids(s)
    T, n = ids.shape[1], s.config.perturbations
    generator = torch.Generator().manual_seed(s.config.seed + 3)
    positions = torch.randint(0, T, (n,), generator=generator)
    shifts = torch.randint(1, s.vocab_size, (n,), generator=generator)
    batch = ids.repeat(n + 1, 1)
    rows = torch.arange(1, n + 1)
    batch[rows, positions] = (batch[rows, positions] + shifts.to(s.device)) % s.vocab_size
    with s.mode(training=False) as model, torch.no_grad():
        p = model(batch)[0][:, -1].float().softmax(-1)
    if not finite(p):
        return CheckResult("perturbation sensitivity", 2, FAIL, "NaN or Inf next-token probabilities")
    tv = 0.5 * (p[1:] - p[0]).abs().sum(-1).cpu()
    flips = int((p[1:].argmax(-1) != p[0].argmax(-1)).sum())
    near = positions >= T - max(1, T // 4)  # the last quarter of the prompt
    by_distance = {
        "last quarter": float(tv[near].mean()) if near.any() else None,
        "earlier": float(tv[~near].mean()) if (~near).any() else None,
    }
    details = {"positions": positions.tolist(), "total_variation": tv.tolist(), "top1_changes": flips}
    details["mean_tv_by_distance"] = by_distance
    summary = (
        f"{n} substitutions: the next-token distribution moves by a total variation of {fmt(float(tv.mean()))} "
        f"on average (max {fmt(float(tv.max()))}); top-1 changes {flips}/{n}"
    )
    if all(v is not None for v in by_distance.values()):
        summary += f"; last quarter {fmt(by_distance['last quarter'])} vs earlier {fmt(by_distance['earlier'])}"
    if float(tv.max()) == 0.0:
        return CheckResult(
            "perturbation sensitivity", 2, WARN, f"{summary}: the prediction ignores the prompt", details
        )
    return CheckResult("perturbation sensitivity", 2, PASS, summary, details)


CHECKS = [attention_patterns, feature_attribution, perturbation_sensitivity]
