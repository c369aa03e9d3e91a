"""Models that are not gpt2lab's GPT-2, driven as GPT2LitModule drives ``GPT2Model``.

``CausalLM`` wraps any ``nn.Module`` whose ``forward`` takes token ids and returns logits (B, T, V), a tuple
``(logits, ...)``, a dict with ``"logits"`` or a ``transformers`` output, and gives it GPT2Model's contract:
``forward(input_ids, labels=None) -> (logits, loss)``. It reads the signature once: the ids go to ``input_ids``
(else to the first parameter), ``attention_mask`` and ``position_ids`` are passed where they are required, and
``use_cache=False`` where it is taken (no key/value cache in training). The loss is always gpt2lab's, the
cross-entropy of the logits against the next tokens, so that every model is scored alike, whatever its own
``forward`` would make of ``labels``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import hydra.utils
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gpt2lab.errors import ConfigError
from gpt2lab.model.cross_entropy import IGNORE_INDEX
from gpt2lab.model.gpt2 import GPT2Config, GPT2Model

# Hydra 1.4 instantiates only ``_target_``s its caller trusts. gpt2lab's configs point into these
# packages; your own classes (a callback of yours, say) are added with GPT2LAB_TRUSTED_TARGETS="mypkg.*".
TRUSTED_TARGETS = (
    "gpt2lab.*",
    "pytorch_lightning.*",
    "lightning.*",
    "lightning_fabric.*",
    "torch.optim.*",
    "optuna.*",
    "datetime.timedelta",  # callbacks.time_checkpoint.train_time_interval
    *(t.strip() for t in os.environ.get("GPT2LAB_TRUSTED_TARGETS", "").split(",") if t.strip()),
)

GPT2_TARGET = "gpt2lab.model.GPT2Config"
# Arguments gpt2lab can make up for a forward that requires them: a (B, T) mask of ones, positions 0..T-1.
FILLED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "attention_mask": torch.ones_like,
    "position_ids": lambda ids: torch.arange(ids.shape[1], device=ids.device).expand_as(ids),
}
NEEDS = (
    "forward(input_ids, attention_mask=None, position_ids=None, labels=None) (the ids may be the first argument "
    "under any name; every other argument needs a default, labels too: gpt2lab computes the loss from the logits), "
    "returning logits of shape (batch, tokens, vocabulary), a tuple (logits, ...), a dict with 'logits', or a "
    "transformers output"
)


class NotGPT2Error(ConfigError, AttributeError):
    """A tool written for gpt2lab's GPT-2 reached for what a CausalLM does not have. Also an AttributeError, so that
    ``hasattr`` and ``getattr(model, name, default)`` answer as usual."""


class CausalLM(nn.Module):
    """``module`` as gpt2lab trains it. ``context_length`` is the window it is trained on; ``vocab_size``, when
    known, is checked against its logits. ``spec`` is the config that rebuilds it (without its weights)."""

    def __init__(
        self, module: nn.Module, context_length: int, vocab_size: int | None = None, spec: dict | None = None
    ) -> None:
        super().__init__()
        self.module = module
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.spec = spec
        self._ids_name, self._positional, self._extra = _driving(module)
        self._check_output()

    @property
    def config(self) -> DictConfig:
        """The spec, read as gpt2lab reads ``GPT2Model.config`` (``config.context_length``)."""
        return OmegaConf.create(self.spec or {"context_length": self.context_length, "vocab_size": self.vocab_size})

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            raise NotGPT2Error(
                f"this model ({_name(module)}) has no {name!r}: generation and chat are written for "
                "gpt2lab's own GPT-2; a model of model=hf or model=module trains, resumes and evaluates"
            ) from None

    def num_parameters(self, non_embedding: bool = False) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_logits: bool | None = None,
        reduction: Literal["mean", "none"] = "mean",
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(logits, loss)`` as ``GPT2Model.forward``: labels are the next tokens, -100 is ignored;
        ``reduction="none"`` gives each token's loss, (B, T) nats, 0 where the label is -100."""
        logits = _logits(self._call(input_ids))
        if labels is None:
            return logits, None
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction
        )
        return (logits if return_logits else None), (loss.view_as(labels) if reduction == "none" else loss)

    def _call(self, input_ids: torch.Tensor) -> Any:
        extra = {name: (fill(input_ids) if fill else False) for name, fill in self._extra.items()}
        if self._positional:
            return self.module(input_ids, **extra)
        return self.module(**{self._ids_name: input_ids}, **extra)

    @torch.no_grad()
    def _check_output(self) -> None:
        """One forward pass on two tokens, so that a module whose output is not logits fails here, at the start."""
        param = next(self.module.parameters(), None)
        if param is not None and param.device.type == "meta":
            return
        ids = torch.zeros(
            1, min(2, self.context_length), dtype=torch.long, device=param.device if param is not None else "cpu"
        )
        was_training = self.module.training
        self.module.eval()
        try:
            out = self._call(ids)
        except Exception as e:
            raise ConfigError(
                f"{_name(self.module)}.forward failed on token ids of shape {tuple(ids.shape)} "
                f"({type(e).__name__}: {e}); gpt2lab drives {NEEDS}"
            ) from e
        finally:
            self.module.train(was_training)
        logits = _logits(out)
        if logits is None or logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ConfigError(
                f"{_name(self.module)}.forward returned {_describe(out)} for token ids of shape {tuple(ids.shape)}; "
                f"gpt2lab drives {NEEDS}"
            )
        if self.vocab_size and logits.shape[-1] < self.vocab_size:
            raise ConfigError(
                f"{_name(self.module)} gives {logits.shape[-1]} logits per token, fewer than the tokenizer's "
                f"{self.vocab_size} tokens: build it with a vocabulary of at least {self.vocab_size} "
                "(${model.vocab_size} in its arguments is the tokenizer's)"
            )


def _driving(module: nn.Module) -> tuple[str | None, bool, dict[str, Callable | None]]:
    """How to call ``module``: the ids' parameter, whether they go positionally, and the other arguments to pass
    (a filler, or None for ``use_cache=False``). Refuses a forward with a required argument gpt2lab cannot give."""
    params = inspect.signature(module.forward).parameters
    kinds = inspect.Parameter
    positional = [p for p in params.values() if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    if "input_ids" in params:
        ids = params["input_ids"]
    elif positional:
        ids = positional[0]
    elif any(p.kind == kinds.VAR_POSITIONAL for p in params.values()):
        ids = None
    else:
        raise ConfigError(
            f"{_name(module)}.forward{inspect.signature(module.forward)} takes no token ids; gpt2lab drives {NEEDS}"
        )
    required = [
        p.name
        for p in params.values()
        if p is not ids and p.default is p.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
    ]
    missing = [name for name in required if name not in FILLED]
    if missing:
        raise ConfigError(
            f"{_name(module)}.forward{inspect.signature(module.forward)} cannot be driven: gpt2lab has no value for "
            f"its required argument{'s' * (len(missing) > 1)} {', '.join(missing)}. It drives {NEEDS}"
        )
    extra: dict[str, Callable | None] = {name: FILLED[name] for name in required}
    if "use_cache" in params:
        extra["use_cache"] = None
    positional_ids = ids is None or ids.kind == kinds.POSITIONAL_ONLY
    return (None if ids is None else ids.name), positional_ids, extra


def _logits(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):  # a dict, or a transformers ModelOutput (an OrderedDict)
        return out.get("logits")
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out)}"
    return f"a {type(out).__name__}"


def _name(module: nn.Module) -> str:
    return type(module).__qualname__


def is_gpt2(spec: GPT2Config | Mapping[str, Any]) -> bool:
    """Whether a model config (``cfg.model``, a checkpoint's ``hyper_parameters["model"]``) is gpt2lab's GPT-2."""
    return isinstance(spec, GPT2Config) or spec.get("_target_", GPT2_TARGET) == GPT2_TARGET


def build_model(spec: GPT2Config | Mapping[str, Any]) -> GPT2Model | CausalLM:
    """The model a config describes: gpt2lab's GPT-2 for ``GPT2Config`` (or its fields), else the ``CausalLM`` its
    ``_target_`` builds (``conf/model/hf.yaml``, ``conf/model/module.yaml``)."""
    if isinstance(spec, GPT2Config):
        return GPT2Model(spec)
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    if is_gpt2(spec):
        return GPT2Model(GPT2Config(**{k: v for k, v in spec.items() if k != "_target_"}))
    try:
        model = hydra.utils.instantiate(spec, _convert_="all", _execution_whitelist_=TRUSTED_TARGETS)
    except InstantiationException as e:
        raise _instantiation_error(spec, e) from e
    except TypeError as e:  # a constructor's own TypeError comes through unwrapped: wrong arguments, or a bug
        key, target = _target_spec(spec)
        error = _arguments_error(key, target)
        if error is None:
            raise
        raise error from e
    if not isinstance(model, CausalLM):
        raise ConfigError(
            f"model._target_={spec['_target_']} built a {type(model).__name__}, not a model gpt2lab can train: for "
            "your own nn.Module use model=module model.module._target_=<your class>"
        )
    model.spec = model.spec or spec
    return model


def _target_spec(spec: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The key of the class the user named, and its config: ``model.module`` for ``model=module``, else ``model``."""
    module = spec.get("module")
    if isinstance(module, Mapping) and "_target_" in module:
        return "model.module", module
    return "model", spec


def _instantiation_error(spec: Mapping[str, Any], e: InstantiationException) -> ConfigError:
    """Hydra's failure to build the model as one line naming the key and the fix."""
    cause = e.__cause__
    if isinstance(cause, ConfigError):
        return cause
    key, target = _target_spec(spec)
    name = target.get("_target_")
    if "whitelist" in str(e):
        package = str(name).split(".")[0]
        return ConfigError(
            f"{key}._target_={name} is not a trusted target: trust its package with "
            f"GPT2LAB_TRUSTED_TARGETS='{package}.*' (gpt2lab builds only the classes of packages you trust)"
        )
    if isinstance(cause, ImportError) or "Error locating target" in str(e):
        innermost: BaseException = cause or e
        while innermost.__cause__ is not None:
            innermost = innermost.__cause__
        why = next((line for line in str(innermost).splitlines() if line.strip()), type(innermost).__name__)
        fix = "install its package, or run from the directory that holds it (or add that directory to PYTHONPATH)"
        if isinstance(innermost, ModuleNotFoundError) and innermost.name == name and "." in str(name):
            why = "{} has no {}".format(*str(name).rsplit(".", 1))  # the package imports; the class is not in it
            fix = "check the class's name and module"
        return ConfigError(f"{key}._target_={name} cannot be imported ({why}): {fix}")
    error = _arguments_error(key, target)
    if error is not None:
        return error
    first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return ConfigError(f"{key}: {first}" + (f" ({type(cause).__name__}: {cause})" if cause else ""))


def _arguments_error(key: str, target: Mapping[str, Any]) -> ConfigError | None:
    """The error for configured arguments that the class's constructor does not accept, or None if it does (the
    failure was then inside the constructor, a bug to show with its traceback)."""
    try:
        cls = hydra.utils.get_object(target["_target_"])
        signature = inspect.signature(cls)
    except Exception:
        return None
    with contextlib.suppress(Exception):  # the annotations as written (``int``, not ``'int'``) where they resolve
        signature = inspect.signature(cls, eval_str=True)
    signature = signature.replace(return_annotation=inspect.Signature.empty)
    given = {k: v for k, v in target.items() if not k.startswith("_")}
    try:
        signature.bind(**given)
    except TypeError as e:
        plus = "+" if key == "model.module" else ""
        return ConfigError(
            f"{key}: {target['_target_']}{signature} cannot be built from {sorted(given) or 'no arguments'} ({e}): "
            f"set its arguments as {plus}{key}.<name>=<value> (the tokenizer's vocabulary is ${{model.vocab_size}})"
        )
    return None
