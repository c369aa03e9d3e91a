"""``python -m gpt2lab.evaluate`` / ``gpt2lab evaluate``: score a checkpoint.

python -m gpt2lab.evaluate ckpt=<.ckpt file | run directory | last | best> [split=test] [data=...]
"""

from omegaconf import DictConfig

from gpt2lab.cli.app import hydra_app
from gpt2lab.evaluate import evaluate


def run(cfg: DictConfig) -> float | None:
    """Score, print and keep the metrics; give a sweep its ``optimized_metric``."""
    return evaluate(cfg).get(cfg.optimized_metric)


main = hydra_app("evaluate", run)

if __name__ == "__main__":
    main()
