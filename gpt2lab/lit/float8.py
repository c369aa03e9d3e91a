"""Float8 matmuls for training (``model.float8=true``), through torchao's float8 training.

``convert_to_float8`` swaps the decoder blocks' ``nn.Linear`` layers for torchao's ``Float8Linear``: each matmul
casts its operands to float8 with a scale computed on the fly (one per tensor with the ``tensorwise`` recipe, one
per row with ``rowwise``) and runs on the float8 tensor cores, which GPUs of compute capability 8.9 or more have
(Ada, Hopper, Blackwell) at twice their dense bf16 rate. ``Float8Linear`` keeps ``weight`` and ``bias`` as the
same plain parameters, so the state_dict keys, the optimizer and the checkpoints stay what they are: a checkpoint
trained so loads without torchao, and export, generation and evaluation of it never see float8.

Left in bf16: the output layer (its weight is the tied embedding, which the fused loss reads directly, and its
logits are where float8's rounding would cost the most), and any layer whose sizes are not multiples of 16, which
float8 matmuls need. The LightningModule converts before it compiles, when a fit starts (``configure_model``).
``check_float8`` is the check at the start of a run (``gpt2lab/train/checks.py``), before any data is read.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gpt2lab.errors import ConfigError

log = logging.getLogger(__name__)

RECIPES = ("tensorwise", "rowwise")  # torchao's Float8LinearRecipeName values offered as model.float8_recipe
MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0) and later
SKIPPED = ("lm_head",)  # the output layer, by name


def check_float8(model: Mapping[str, Any], trainer: Mapping[str, Any]) -> None:
    """A ``ConfigError`` (one line) if ``model.float8=true`` cannot run: a recipe torchao does not offer, no CUDA GPU
    of compute capability 8.9 or more for this run, or no torchao. ``model`` is ``cfg.model`` (gpt2lab's GPT-2:
    other models have no ``float8`` key, and the config's schema refuses one), ``trainer`` is ``cfg.trainer``."""
    recipe = model.get("float8_recipe", "tensorwise")
    if recipe not in RECIPES:
        raise ConfigError(f"model.float8_recipe={recipe}: expected one of {', '.join(RECIPES)} (torchao's recipes)")
    if not model.get("float8"):
        return
    accelerator = str(trainer.get("accelerator"))
    if accelerator not in ("gpu", "cuda", "auto"):
        raise ConfigError(
            f"model.float8=true runs the matmuls on a GPU's float8 tensor cores, and this run has "
            f"trainer.accelerator={accelerator}: use trainer=gpu, or model.float8=false"
        )
    if not torch.cuda.is_available():
        raise ConfigError(
            "model.float8=true needs a CUDA GPU of compute capability 8.9 or more (H100, H200, L4, RTX 40xx), and "
            "this machine has no CUDA GPU: set model.float8=false"
        )
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        raise ConfigError(
            f"model.float8=true needs a CUDA GPU of compute capability 8.9 or more (H100, H200, L4, RTX 40xx); "
            f"this one, {torch.cuda.get_device_name()}, has {capability[0]}.{capability[1]} and no float8 "
            "tensor cores: set model.float8=false"
        )
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(
            "model.float8=true trains through torchao's float8 training, which is not installed: pip install "
            "torchao (or pip install -e '.[gpu]'), or set model.float8=false"
        )


def float8_filter(module: nn.Module, name: str) -> bool:
    """Whether torchao converts this layer: a plain ``nn.Linear`` (not the output layer, not one already converted)
    whose input and output sizes are multiples of 16."""
    return (
        type(module) is nn.Linear
        and name.rsplit(".", 1)[-1] not in SKIPPED
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def convert_to_float8(model: nn.Module, recipe: str = "tensorwise", emulate: bool = False) -> int:
    """Swap ``model``'s linear layers that ``float8_filter`` admits for torchao's ``Float8Linear``, in place, with
    ``recipe``'s scaling; returns how many it swapped (0 on a second call). ``emulate``: float8 arithmetic emulated
    in higher precision, for CPU tests (torchao's own option)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    before = sum(type(m) is nn.Linear for m in model.modules())
    convert_to_float8_training(model, module_filter_fn=float8_filter, config=config)
    swapped = before - sum(type(m) is nn.Linear for m in model.modules())
    log.info("model.float8: %d linear layers train with float8 matmuls (torchao, %s scaling)", swapped, recipe)
    return swapped
