"""The Python API: ``train_model`` and ``load_preset``, for notebooks and scripts.

Both compose ``conf/train.yaml`` with Hydra as ``python train.py`` does (the same config tree, schemas and error
messages), and ``train_model`` runs the composed config the way Hydra runs the command line: the run directory
``outputs/<date>/<time>/`` with ``.hydra/``, ``train.log``, ``config.yaml``, checkpoints and ``results.json``,
and the same Hydra callbacks (the run directory is checked and locked). Only ``sys.argv`` is not read.

    from gpt2lab import train_model, load_preset
    results = train_model(preset="tiny", overrides={"trainer.max_steps": 200})
    results = train_model(model=my_module, dataset="my.txt", max_steps=500)  # any nn.Module
    cfg = load_preset("small", **{"model.num_layers": 6}); train_model(cfg=cfg)
"""

from __future__ import annotations

import copy
import logging
import os
import uuid
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, run_job
from hydra.types import HydraContext, RunMode
from hydra.utils import execution_whitelist
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from gpt2lab.config import TRUSTED_TARGETS, compose_train, config_tree, group_options, hydra_string
from gpt2lab.errors import ConfigError
from gpt2lab.hydra_internals import Callbacks

Overrides = Mapping[str, Any] | Sequence[str] | None
# Modules passed as objects to train_model(model=...), by the key their config names (see registered_module).
# Weak: an entry lives as long as the module does.
_MODULES: weakref.WeakValueDictionary[str, nn.Module] = weakref.WeakValueDictionary()
_HANDED_OUT: set[str] = set()


def load_preset(name: str = "tiny", overrides: Overrides = None, **dotted: Any) -> DictConfig:
    """``conf/train.yaml`` with ``preset=name`` and the overrides, composed as ``python train.py preset=<name>
    key=value ...`` composes it: a key or value the command line rejects raises a ``ConfigError`` with Hydra's
    message. ``overrides``: a mapping of dotted keys to values (``{"trainer.max_steps": 200, "model": "gpt2"}``)
    or command-line strings; keyword arguments add to it (``**{"model.num_layers": 6}``).

    The config keeps Hydra's own node (``cfg.hydra``), so that ``train_model(cfg=cfg)`` runs it as the command
    line would; edit the rest freely (``cfg.trainer.max_steps = 50``)."""
    return _compose([f"preset={name}", *_as_overrides(overrides), *_as_overrides(dotted)])


def train_model(
    preset: str | None = None,
    overrides: Overrides = None,
    *,
    cfg: DictConfig | None = None,
    model: nn.Module | None = None,
    dataset: str | os.PathLike | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train as ``python train.py`` does and return what the run made:

    - ``run_dir``: the run directory (``outputs/<date>/<time>``, or ``hydra.run.dir``);
    - ``best_model_path``: the best checkpoint ("" when checkpointing is off);
    - ``final_metrics``: the last logged values (``val/loss``, ``test/loss``, ...);
    - ``model`` and ``tokenizer``: the trained model (a ``GPT2Model``, or the ``CausalLM`` around ``model``) and
      its ``tokenizers.Tokenizer``, ready for ``gpt2lab.generate``;
    - ``results``: ``results.json``'s content; ``config``: the config it ran.

    Either ``cfg`` (from ``load_preset``), or ``preset`` (default: tiny) with ``overrides`` and the shortcuts:
    ``dataset`` is a ``conf/data`` option (``pystdlib``) or your text (a file, directory or glob: ``data=files``);
    ``max_steps`` sets ``trainer.max_steps``; ``model`` is any ``nn.Module`` whose forward takes token ids and
    returns logits (``model=module``, docs/import-export.md), trained in place with the preset's context.
    Overrides come last, so they win over the shortcuts."""
    if cfg is not None:
        if any(a is not None for a in (preset, overrides, model, dataset, max_steps)):
            raise ConfigError(
                "train_model(cfg=...) runs that config as it is: set preset, overrides, model, dataset and max_steps "
                "when making it (load_preset(name, overrides)), or edit it (cfg.trainer.max_steps = ...)"
            )
    else:
        shortcuts = _dataset_overrides(dataset) if dataset is not None else []
        if max_steps is not None:
            shortcuts.append(f"trainer.max_steps={max_steps}")
        if model is not None:
            context = load_preset(preset or "tiny", [*shortcuts, *_as_overrides(overrides)]).model.get("context_length")
            shortcuts += _module_overrides(model, context)
        cfg = load_preset(preset or "tiny", [*shortcuts, *_as_overrides(overrides)])
    run = _run(cfg)
    return {
        "run_dir": run.output_dir,
        "best_model_path": run.results["best_checkpoint"],
        "final_metrics": run.results["metrics"],
        "model": run.model,
        "tokenizer": run.tokenizer,
        "results": run.results,
        "config": OmegaConf.load(run.output_dir / "config.yaml")
        if (run.output_dir / "config.yaml").is_file()
        else None,
    }


def registered_module(key: str) -> nn.Module:
    """The ``_target_`` that hands a module passed to ``train_model(model=...)`` to ``model=module``'s adapter:
    the object itself the first time (it is trained in place), a copy of it later (a checkpoint of that run loaded
    again in this session, whose weights then replace the copy's)."""
    module = _MODULES.get(key)
    if module is None:
        raise ConfigError(
            f"model.module.key={key}: this model was a module object passed to train_model(model=...) in another "
            "Python session. Build the module again and load the checkpoint's weights into it: "
            "module.load_state_dict({k.removeprefix('model.module.'): v for k, v in torch.load(ckpt, weights_only=True)"
            "['state_dict'].items()})"
        )
    if key in _HANDED_OUT:
        return copy.deepcopy(module)
    _HANDED_OUT.add(key)
    return module


# -- composing -----------------------------------------------------------------------------------------------------
def _compose(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` with Hydra's node, ready to run as the command line runs it (``hydra.mode``: RUN). Composed
    on gpt2lab's own tree even where Hydra was initialized on another (a script's own Hydra app)."""
    with config_tree():
        cfg = compose_train(overrides, hydra_node=True)
    with open_dict(cfg):
        cfg.hydra.mode = cfg.hydra.mode or RunMode.RUN
    return cfg


def _as_overrides(overrides: Overrides) -> list[str]:
    """Command-line strings from a mapping of dotted keys to Python values (or from strings, kept as they are)."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ConfigError(f"overrides={overrides!r}: expected a dict of keys to values, or a list of key=value strings")
    if isinstance(overrides, Mapping):
        return [key if key.startswith("~") else f"{key}={_hydra_value(value)}" for key, value in overrides.items()]
    return [str(o) for o in overrides]


def _hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar: strings quoted (so that ``def f(x):`` or a path with ``=`` arrive as
    typed; ``${...}`` interpolations still resolve inside quotes), lists and dicts element by element."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return hydra_string(str(value))


def _dataset_overrides(dataset: str | os.PathLike) -> list[str]:
    """A ``conf/data`` option by name, else text files at that path."""
    if isinstance(dataset, str) and dataset in group_options("data"):
        return [f"data={dataset}"]
    return ["data=files", f"data.path={_hydra_value(str(Path(dataset).expanduser().resolve()))}"]


def _module_overrides(module: nn.Module, context_length: int | None) -> list[str]:
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model={type(module).__name__}: expected a torch.nn.Module (or leave model out)")
    if not context_length:
        raise ConfigError("model=<module>: the preset sets no model.context_length; add it to the overrides")
    key = f"{type(module).__name__}-{uuid.uuid4().hex[:12]}"
    _MODULES[key] = module
    return [
        "model=module",
        "model.module._target_=gpt2lab.train.api.registered_module",
        f"+model.module.key={key}",
        f"model.context_length={context_length}",
    ]


# -- running -------------------------------------------------------------------------------------------------------
def _run(cfg: DictConfig) -> Any:
    """Run ``cfg`` as ``hydra.main`` runs ``python train.py``'s: Hydra's callbacks around ``run_job``, which makes
    the run directory, writes ``.hydra/``, sets up the job's logging and ``${hydra:...}``, then calls train."""
    from gpt2lab.train.run import TrainedRun, train_run  # Lightning and torch load here, not on ``import gpt2lab``

    if "hydra" not in cfg:
        raise ConfigError(
            "train_model(cfg=...): the config has no hydra node; make it with load_preset(...) (or hydra's compose "
            "with return_hydra_config=True)"
        )
    cfg = copy.deepcopy(cfg)  # run_job writes the run directory into it; the caller's config stays as it was
    runs: list[TrainedRun] = []

    def task(task_cfg: DictConfig) -> float | None:
        runs.append(train_run(task_cfg))
        return runs[-1].metric

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with config_tree(), execution_whitelist(TRUSTED_TARGETS):
            callbacks = Callbacks(cfg)  # built as hydra.main builds them (gpt2lab.hydra_internals: why private)
            ret = JobReturn()
            context = HydraContext(
                config_loader=GlobalHydra.instance().config_loader(),
                callbacks=callbacks,
                execution_whitelist=[*TRUSTED_TARGETS, *_module_classes(cfg)],
            )
            try:
                callbacks.on_run_start(config=cfg, config_name="train")
                ret = run_job(task, cfg, "hydra.run.dir", None, context, configure_logging=True)
            finally:
                callbacks.on_run_end(config=cfg, config_name="train", job_return=ret)
            _ = ret.return_value  # the training's exception, if it failed
    finally:
        # The job's logging (a console handler and <run>/train.log) ends with the job, as with its process on the
        # command line: the caller's logging is given back.
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    return runs[-1]


def _module_classes(cfg: DictConfig) -> list[str]:
    """The class of a module passed as an object: trusted, since its caller built it (a class named in the config
    instead needs GPT2LAB_TRUSTED_TARGETS, as on the command line)."""
    if OmegaConf.select(cfg, "model.module._target_") != "gpt2lab.train.api.registered_module":
        return []
    module = _MODULES.get(OmegaConf.select(cfg, "model.module.key"))
    return [] if module is None else [f"{type(module).__module__}.{type(module).__qualname__}"]
