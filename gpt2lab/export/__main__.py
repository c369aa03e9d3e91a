"""``python -m gpt2lab.export`` / ``gpt2lab export``: a checkpoint as Hugging Face, ONNX and TorchScript directories.

python -m gpt2lab.export ckpt=<.ckpt file | run directory | last | best> format=hf|onnx|torchscript|all output_dir=...
"""

from omegaconf import DictConfig

from gpt2lab.cli.app import hydra_app
from gpt2lab.exporters.export import export, summary


def run(cfg: DictConfig) -> None:
    """Export, then print a table of the exports (and the speed of each benchmarked one)."""
    print(summary(export(cfg)))


main = hydra_app("export", run)

if __name__ == "__main__":
    main()
