"""``python -m gpt2lab.evaluate`` / ``gpt2lab evaluate``: score a checkpoint.

python -m gpt2lab.evaluate ckpt=<.ckpt file | run directory | last | best> [split=test] [data=...]
python -m gpt2lab.evaluate ckpt=... tasks=[hellaswag,lambada_openai] [limit=N] [num_fewshot=K]   (lm-eval)
"""

from omegaconf import DictConfig

from gpt2lab.cli.app import hydra_app
from gpt2lab.evaluate import evaluate
from gpt2lab.evaluate.tasks import evaluate_tasks


def run(cfg: DictConfig) -> float | None:
    """Score, print and keep the metrics (of lm-eval's tasks, if named); give a sweep its ``optimized_metric``."""
    metrics = evaluate_tasks(cfg) if cfg.tasks is not None else evaluate(cfg)
    return metrics.get(cfg.optimized_metric)


main = hydra_app("evaluate", run)

if __name__ == "__main__":
    main()
