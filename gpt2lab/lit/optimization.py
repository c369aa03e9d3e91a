"""What a run optimizes with: AdamW's parameter groups, Muon beside AdamW, the learning-rate schedules, and the
checks of their settings that run before any data is read.

``optimizer=muon`` is the split that Muon's authors give (Keller Jordan, "Muon: An optimizer for hidden layers in
neural networks", 2024, and the modded-nanogpt speedrun records; PyTorch's ``torch.optim.Muon`` documents the same):
Muon orthogonalises the update of each hidden weight matrix, the attention and MLP matrices; the embeddings, the
output layer, the biases and the norms' gains are not such matrices, and AdamW trains them with a learning rate
of their own. ``MuonWithAdamW`` steps both as one ``torch.optim.Optimizer``, so that Lightning, the schedules,
gradient clipping, accumulation and checkpoints see one optimizer whose state holds both.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import hydra.utils
import torch
from omegaconf import DictConfig, ListConfig
from torch import nn

from gpt2lab.config import TRUSTED_TARGETS
from gpt2lab.errors import ConfigError

log = logging.getLogger(__name__)

MUON_TORCH = "2.9"  # the first torch with torch.optim.Muon
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn


# -- the optimizers -----------------------------------------------------------------------------------------------
def adamw_groups(parameters: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's two groups: matrices (linear weights, embeddings) decayed, biases and norm gains not."""
    params = [p for p in parameters if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights between layers, Muon's share: every trainable 2-D parameter except embeddings and the
    output layer (which GPT-2 ties to the token embedding). A model that names its output layer
    (``get_output_embeddings``, as transformers' do) has it left out; so has any matrix with a row per token."""
    left_out = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = set()
    if isinstance(getattr(output, "weight", None), torch.Tensor):
        left_out.add(id(output.weight))
    elif isinstance(getattr(model, "vocab_size", None), int):  # an output layer that is not named: a row per token
        vocab.add(model.vocab_size)
    return [
        p
        for p in model.parameters()
        if p.requires_grad and p.dim() == 2 and id(p) not in left_out and p.shape[0] not in vocab
    ]


def muon_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """``MuonWithAdamW``'s groups: AdamW's two (other matrices decayed by ``weight_decay``, vectors not), then the
    hidden matrices, marked for Muon."""
    hidden = hidden_matrices(model)
    if not hidden:
        raise ConfigError(
            f"optimizer=muon: this model ({type(model).__name__}) has no 2-D hidden weights for Muon to train (only "
            "embeddings, an output layer, biases or norms): use optimizer=adamw"
        )
    chosen = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    return [*adamw_groups(rest, weight_decay), {"params": hidden, "muon": True}]


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` for the groups not marked ``"muon": True``, and ``torch.optim.Muon`` for those that are
    (``muon_groups``), stepped together. ``param_groups`` are the two optimizers' own, AdamW's first, so a
    schedule sets both learning rates (each keeps its ratio to its own base); ``state_dict`` is one standard
    optimizer state over all parameters, in that order.

    ``lr``, ``betas``, ``eps``, ``weight_decay`` and ``fused`` are AdamW's, named as ``optimizer=adamw`` names them,
    so that a preset's AdamW settings apply to the parameters AdamW still trains; ``muon_lr``, ``momentum``,
    ``nesterov``, ``ns_steps``, ``muon_weight_decay`` and ``adjust_lr_fn`` are Muon's."""

    def __init__(
        self,
        params: Iterable[dict[str, Any]] | Iterable[torch.Tensor],
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fused: bool | None = None,
        muon_lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        muon_weight_decay: float = 0.0,
        adjust_lr_fn: str | None = None,
    ) -> None:
        if not hasattr(torch.optim, "Muon"):
            raise ConfigError(
                f"optimizer=muon needs torch.optim.Muon, which torch {MUON_TORCH} brought; this is torch "
                f"{torch.__version__}: pip install 'torch>={MUON_TORCH}', or use optimizer=adamw"
            )
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in params]
        adamw = [g for g in groups if not g.get("muon")]
        muon = [{k: v for k, v in g.items() if k != "muon"} for g in groups if g.get("muon")]
        if not muon:
            raise ConfigError("optimizer=muon: no parameter group is marked for Muon (muon_groups makes them)")
        inner: list[torch.optim.Optimizer] = []
        if adamw:
            betas = (float(betas[0]), float(betas[1]))
            inner.append(torch.optim.AdamW(adamw, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused))
        inner.append(
            torch.optim.Muon(
                muon,
                lr=muon_lr,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                weight_decay=muon_weight_decay,
                adjust_lr_fn=adjust_lr_fn,
            )
        )
        # The inner optimizers' group dicts themselves: a schedule that sets an lr here sets it there.
        super().__init__([g for o in inner for g in o.param_groups], {})
        self._inner = inner

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:  # Lightning's closure runs forward and backward: once, for both
            with torch.enable_grad():
                loss = closure()
        with _float32_orthogonalisation(self._inner[-1].param_groups[0]["params"][0].device.type == "cpu"):
            for optimizer in self._inner:
                optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """One optimizer's state over all parameters: AdamW's groups and parameters first, then Muon's."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for optimizer in self._inner:
            own = optimizer.state_dict()
            state |= {offset + i: s for i, s in own["state"].items()}
            for group in own["param_groups"]:
                groups.append({**group, "params": [offset + i for i in group["params"]]})
            offset += sum(len(g["params"]) for g in optimizer.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(ours["params"]) for saved, ours in zip(groups, self.param_groups, strict=False)
        ):
            raise ConfigError(
                "the checkpoint's optimizer state does not fit optimizer=muon's groups (AdamW's parameters, then "
                "Muon's hidden matrices): it was saved by another optimizer or another model"
            )
        first = 0
        offset = 0
        for optimizer in self._inner:
            count = len(optimizer.param_groups)
            own_groups = groups[first : first + count]
            ids = [i for g in own_groups for i in g["params"]]
            optimizer.load_state_dict(
                {
                    "state": {i - offset: state_dict["state"][i] for i in ids if i in state_dict["state"]},
                    "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in own_groups],
                }
            )
            first += count
            offset += len(ids)
        # torch's load_state_dict gives each optimizer new group dicts: these must be them, for the schedule
        self.param_groups = [g for o in self._inner for g in o.param_groups]


def _newton_schulz_float32(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz iteration (``torch/optim/_muon.py``), in float32 instead of bfloat16."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextlib.contextmanager
def _float32_orthogonalisation(on_cpu: bool) -> Iterator[None]:
    """On a CPU, torch.optim.Muon's step with its orthogonalisation in float32. torch (2.9-2.13) runs it in
    bfloat16, which suits GPUs; CPUs without bfloat16 units run those matmuls about 8x slower than float32, and the
    default run's step took 0.8 s more (170x AdamW's). Where torch's iteration is not found under its name, its own
    runs."""
    module = getattr(torch.optim, "_muon", None)
    original = getattr(module, "_zeropower_via_newtonschulz", None)
    if not on_cpu or original is None:
        yield
        return
    module._zeropower_via_newtonschulz = _newton_schulz_float32
    try:
        yield
    finally:
        module._zeropower_via_newtonschulz = original


def is_muon(optimizer: DictConfig | dict[str, Any]) -> bool:
    return optimizer.get("_target_") == f"{MuonWithAdamW.__module__}.{MuonWithAdamW.__qualname__}"


def build_optimizer(
    model: nn.Module, optimizer: dict[str, Any], device: torch.device, grad_scaler: bool
) -> torch.optim.Optimizer:
    """The configured optimizer over ``model``'s parameters: ``optimizer=muon``'s two groups, or AdamW's (and any
    other ``_target_``'s) decayed matrices and undecayed vectors."""
    cfg = dict(optimizer)
    if cfg.get("fused") is None and "fused" in cfg:
        # The fused CUDA kernel is the fast path; fp16's GradScaler needs the unfused one.
        cfg["fused"] = device.type == "cuda" and not grad_scaler
    weight_decay = cfg.pop("weight_decay", 0.0)
    groups = muon_groups(model, weight_decay) if is_muon(cfg) else adamw_groups(model.parameters(), weight_decay)
    return hydra.utils.instantiate(cfg, _partial_=True, _convert_="all", _execution_whitelist_=TRUSTED_TARGETS)(groups)


# -- the schedules ------------------------------------------------------------------------------------------------
def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the optimizer's lr, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_stable_decay(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    max_steps: int,
    decay_fraction: float = 0.3,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup-stable-decay: linear warmup to the optimizer's lr, the lr held there, then a linear decay to
    ``min_lr_ratio * lr`` over the last ``decay_fraction`` of ``max_steps``. Only the last stretch depends on where
    the run ends, so a run resumed with a larger ``trainer.max_steps`` (from a checkpoint saved before the decay)
    goes on at the same lr and decays at its new end (Hägele et al., "Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations", 2024)."""
    decay_steps = max(round(decay_fraction * max_steps), 1 if decay_fraction > 0 else 0)
    decay_start = max_steps - decay_steps

    def factor(step: int) -> float:
        warm = (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0
        if step < decay_start or not decay_steps:
            return warm
        progress = min((step - decay_start) / decay_steps, 1.0)
        return min(warm, 1 - (1 - min_lr_ratio) * progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- the checks, before any data is read ----------------------------------------------------------------------------
def check_optimization(optimizer: DictConfig, scheduler: DictConfig | None, max_steps: int) -> None:
    """Optimizer and schedule values, checked before any data is read, naming the key: torch.optim would
    refuse them only after data preparation and the first validation, with a bare traceback."""
    muon = is_muon(optimizer)
    for key, ok, expected in (
        ("lr", lambda v: v > 0, "a positive learning rate, e.g. 3e-4"),
        ("muon_lr", lambda v: v > 0, "a positive learning rate for Muon's hidden matrices, e.g. 0.02"),
        ("eps", lambda v: v >= 0, "a small non-negative number, e.g. 1e-8"),
        ("weight_decay", lambda v: v >= 0, "a non-negative decay, e.g. 0.1"),
        ("muon_weight_decay", lambda v: v >= 0, "a non-negative decay, e.g. 0.0"),
        ("betas", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1), e.g. [0.9, 0.95]"),
        ("momentum", lambda v: 0 <= v < 1, "Muon's momentum in [0, 1), e.g. 0.95"),
        ("ns_steps", lambda v: v >= 1, "1 or more Newton-Schulz iterations, e.g. 5"),
        ("adjust_lr_fn", lambda v: v in ADJUST_LR_FNS, "null, original or match_rms_adamw (torch.optim.Muon's)"),
    ):
        value = optimizer.get(key)
        if value is not None and not ok(value):
            raise ConfigError(f"optimizer.{key}={_plain(value)}: expected {expected}")
    params: list[Any] = [torch.zeros(1, requires_grad=True)]
    if muon:
        params = [{"params": params}, {"params": [torch.zeros(2, 2, requires_grad=True)], "muon": True}]
    try:  # whatever else this optimizer checks in its constructor
        build = hydra.utils.instantiate(
            optimizer, _partial_=True, _convert_="all", _execution_whitelist_=TRUSTED_TARGETS
        )
        build(params)
    except Exception as e:
        cause = e.__cause__ or e
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"optimizer ({optimizer.get('_target_')}): {type(cause).__name__}: {cause}") from e
    if not scheduler or not scheduler.get("_target_"):
        return
    warmup, min_lr_ratio = scheduler.get("warmup_steps"), scheduler.get("min_lr_ratio")
    decay_fraction = scheduler.get("decay_fraction")
    if warmup is not None and warmup < 0:
        raise ConfigError(f"scheduler.warmup_steps={warmup}: expected 0 or more steps")
    if min_lr_ratio is not None and not 0 <= min_lr_ratio <= 1:
        raise ConfigError(
            f"scheduler.min_lr_ratio={min_lr_ratio}: expected a fraction of optimizer.lr in [0, 1] (1: no decay)"
        )
    if decay_fraction is not None and not 0 <= decay_fraction <= 1:
        raise ConfigError(
            f"scheduler.decay_fraction={decay_fraction}: expected the fraction of trainer.max_steps to decay over, "
            "in [0, 1] (e.g. 0.2: the last fifth; 0: no decay)"
        )
    if warmup and max_steps > 0 and warmup >= max_steps:
        log.warning(
            "scheduler.warmup_steps=%d >= trainer.max_steps=%d: the learning rate never reaches optimizer.lr=%s; "
            "lower scheduler.warmup_steps for a run this short",
            warmup, max_steps, optimizer.get("lr"),
        )  # fmt: skip


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple | ListConfig) else value
