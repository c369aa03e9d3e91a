"""gpt2lab's model in the reference script's own training loop.

``python -m gpt2lab.bench.reference_loop reference_step.py [overrides]`` builds the model that the overrides
describe (compiled as ``compile``/``compile_mode``/``compile_options`` say) and times it with the reference
script's ``bench`` function: same loop, same random tokens, same optimizer. Against the reference's own
row it measures the model code alone; against the ``python -m gpt2lab.bench`` row, the Lightning path.
``B`` and ``STEPS`` come from the environment, as the script reads them. ``python -m gpt2lab.bench
--reference-variants nano_compile gpt2lab-model`` runs it beside the others. Like every bench it first waits for
the CPU cores to be free (``bench.machine``: ``--busy-ok``, ``--busy-wait SECONDS``, anywhere after the script).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

from gpt2lab.bench import machine
from gpt2lab.bench.training import REFERENCE_LOOP_VARIANT
from gpt2lab.config import compose_train
from gpt2lab.errors import ConfigError
from gpt2lab.lit.module import inductor_options
from gpt2lab.model import GPT2Model

REFERENCE_VOCAB = 50257  # the reference draws its random tokens below this


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not Path(argv[0]).is_file():
        print(
            "usage: python -m gpt2lab.bench.reference_loop reference_step.py [overrides] [--busy-ok] [--busy-wait S]",
            file=sys.stderr,
        )
        return 2
    guard = argparse.ArgumentParser(prog="python -m gpt2lab.bench.reference_loop", add_help=False)
    machine.add_busy_options(guard)
    busy, overrides = guard.parse_known_args(argv[1:])
    spec = importlib.util.spec_from_file_location("reference_step", argv[0])
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    try:
        cfg = compose_train(overrides)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    config = instantiate(cfg.model, vocab_size=cfg.model.vocab_size or REFERENCE_VOCAB)
    if config.vocab_size < REFERENCE_VOCAB:
        print(
            f"Error: model.vocab_size={config.vocab_size}: the reference's tokens need {REFERENCE_VOCAB}",
            file=sys.stderr,
        )
        return 2
    try:
        gpu = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
        machine.wait_for_free_cores(busy.busy_ok, busy.busy_wait, gpu=gpu)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    torch.manual_seed(cfg.seed)
    model = GPT2Model(config).to(reference.dev)
    if cfg.compile:
        model.compile(options=inductor_options(cfg.compile_mode, cfg.compile_options))
    reference.bench(
        REFERENCE_LOOP_VARIANT, model, lambda x, y: model(x, y)[1], model.num_parameters(non_embedding=True)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
