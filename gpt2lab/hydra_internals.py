"""Every private part of Hydra that gpt2lab uses, in one place, each with the reason no public API serves.

- ``Callbacks``: the ``hydra.callbacks`` of a config, built as ``hydra.main`` builds them. The Python API
  (``gpt2lab.train.api``) runs a config with ``hydra.core.utils.run_job``, which needs them, and Hydra has no
  public way to build them (its own runner and ``hydra.types.HydraContext`` use this class).
- ``BasicSweeper``: Hydra's grid sweeper (``hydra/sweeper=basic``, its default), which gpt2lab's extends
  (``gpt2lab.sweep.plugin.GPT2LabBasicSweeper``). Hydra's own config names this module as its ``_target_``.

Light on purpose: the sweeper plugin imports it on every Hydra run, PyTorch or not.
"""

from hydra._internal.callbacks import Callbacks
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

__all__ = ["BasicSweeper", "Callbacks"]
