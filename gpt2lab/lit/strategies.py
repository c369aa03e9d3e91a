"""Distributed strategies whose arguments are Python objects, so that a YAML file can name them.

Lightning's ``FSDPStrategy`` wants its wrapping policy as a set of module classes; here it is fixed to
the unit that suits GPT-2, one decoder block, so ``conf/trainer/fsdp.yaml`` stays plain data.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.strategies import FSDPStrategy

from gpt2lab.model.gpt2 import DecoderBlock


def fsdp_strategy(**kwargs: Any) -> FSDPStrategy:
    """Lightning's ``FSDPStrategy`` with each ``DecoderBlock`` as its own FSDP unit: parameters are
    gathered one block at a time in forward and backward, so peak memory holds one block unsharded.
    ``kwargs`` go to ``FSDPStrategy`` (``sharding_strategy``, ``state_dict_type``, ``cpu_offload``...)."""
    return FSDPStrategy(auto_wrap_policy={DecoderBlock}, **kwargs)
