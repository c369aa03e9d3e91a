"""``python -m gpt2lab.generate`` / ``gpt2lab generate``: continue text with a checkpoint, or with an ONNX export
(``onnx=<dir>``), which also runs where PyTorch is not installed.

python -m gpt2lab.generate ckpt=<.ckpt file | run directory | last | best> prompt="..." [output=samples.jsonl]
"""

import sys

from omegaconf import DictConfig

from gpt2lab.inference.run import generate


def run(cfg: DictConfig) -> None:
    """Print (and append to ``output=``) the completions ``conf/generate.yaml`` describes."""
    generate(cfg)


def main() -> None:
    """Entry point: the Hydra app on ``conf/generate.yaml``; without PyTorch, ``onnx=`` composes without it."""
    try:
        from gpt2lab.cli.app import hydra_app
    except ImportError:  # gpt2lab.config's schemas import torch
        if not any(arg.startswith("onnx=") for arg in sys.argv[1:]):
            raise
        from gpt2lab.generate.without_torch import hydra_app
    hydra_app("generate", run, literal_keys=("prompt",))()


if __name__ == "__main__":
    main()
