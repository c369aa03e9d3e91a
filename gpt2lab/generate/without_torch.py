"""``python -m gpt2lab.generate onnx=<export dir>`` where PyTorch is not installed: the config tree composed from its
YAML files alone. ``gpt2lab.config`` (the typed schemas, the Hydra-app factory) imports torch, so an unknown key
still fails here, but a value of the wrong type only when it is used."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from gpt2lab.errors import report_errors

# What the no-torch config may build: Hydra's no-op callback and the secrets resolver (which needs no torch).
NO_TORCH_TARGETS = ("hydra.experimental.callback.*", "gpt2lab.secrets.*")
# conf/hydra/default.yaml's callbacks (distributed ranks, sweep summaries, the run directory's lock) need torch, and
# a generation needs none of them.
TORCH_CALLBACKS = ("external_ranks", "sweep_summary", "run_directory")


def quoted(text: str) -> str:
    """``text`` in quotes for Hydra's override grammar, as ``gpt2lab.config.hydra_string`` quotes it (a copy: this
    runs where torch, which gpt2lab.config imports, is not installed): ``prompt=def f(n):`` would otherwise trip
    on the parentheses."""
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        return text
    return "'" + re.sub(r"(\\+)(?='|$)", r"\1\1", text).replace("'", "\\'") + "'"


def hydra_app(config_name: str, task: Callable[[DictConfig], Any], literal_keys: tuple[str, ...] = ()) -> Callable:
    """``gpt2lab.cli.app.hydra_app`` without torch: the command-line entry of ``task`` on the installed
    ``conf/<config_name>.yaml``, without its schema and with the torch-only callbacks replaced by no-ops."""

    def main() -> Any:
        sys.argv = [
            f"{key}={quoted(value)}" if sep and key in literal_keys else arg
            for arg in sys.argv
            for key, sep, value in [arg.partition("=")]
        ]
        ConfigStore.instance().store(name=f"{config_name}_schema", node={}, replace=True)
        no_op = "hydra.experimental.callback.Callback"
        sys.argv += [f"hydra.callbacks.{name}._target_={no_op}" for name in TORCH_CALLBACKS]
        app = hydra.main(
            config_path="pkg://gpt2lab.conf", config_name=config_name, execution_whitelist=NO_TORCH_TARGETS
        )
        return app(report_errors(task))()

    return main
